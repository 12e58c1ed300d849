"""`python -m xray_cls.predict`: a trained model on new image files, with Grad-CAM overlays."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xray_cls.core.errors import UserInputError
from xray_cls.data import CLASS_NAMES, PneumoniaMNISTDataModule, normalize
from xray_cls.models.checkpoints import load_classifier
from xray_cls.predict import OVERLAY_SIDE, predict

from conftest import at_depth, compose_config, run_cli, write_dicom, write_image


def predict_in(out_dir: Path, ckpt: Path, input_path: Path, *overrides: str) -> Path:
    return predict(compose_config(out_dir, [f"ckpt={ckpt}", f"input={input_path}", *overrides], name="predict"))


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nested folders with the image kinds users bring, and the junk beside them."""
    root = tmp_path_factory.mktemp("to_predict")
    (root / "ward_a" / "day1").mkdir(parents=True)
    for i in range(4):  # png / RGB jpeg / RGBA png / JPG, of varied sizes
        write_image(root / "ward_a" / f"scan_{i}", label=i % 2, index=i)
        write_image(root / "ward_a" / "day1" / f"scan_{i}", label=i % 2, index=10 + i)
    pixels16 = (np.random.default_rng(0).random((70, 90)) * 65535).astype(np.uint16)
    Image.fromarray(pixels16).save(root / "sixteen_bit.png")  # mode I;16
    Image.fromarray(np.full((6000, 6000), 128, np.uint8)).save(root / "huge.png")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "ward_a" / "._scan_1.jpeg").write_bytes(b"\x00\x05\x16\x07")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpeg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


def test_folder_gives_one_row_per_readable_image(cnn_run: Path, mixed_folder: Path, tmp_path: Path, capsys) -> None:
    ckpt = cnn_run / "checkpoints" / "best.ckpt"
    csv_path = tmp_path / "out" / "predictions.csv"
    with pytest.raises(UserInputError, match=rf"1 of 11 image file\(s\) could not be read .*other 10 are in {csv_path}"):
        predict_in(tmp_path / "out", ckpt, mixed_folder, "gradcam=true")  # broken.jpeg fails the command, after the CSV
    rows = read_rows(csv_path)
    readable = [p for p in mixed_folder.rglob("*") if p.suffix.lower() in {".png", ".jpeg", ".jpg"}
                and not p.name.startswith(".") and p.name != "broken.jpeg"]
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in readable)
    assert "skipped 3 file(s) that are not images and 1 unreadable image(s)" in capsys.readouterr().out
    threshold = load_classifier(ckpt).hparams.threshold
    for row in rows:
        probability = float(row["probability_pneumonia"])
        assert 0 <= probability <= 1
        assert float(row["threshold"]) == pytest.approx(threshold, abs=1e-6)
        assert row["predicted_label"] == CLASS_NAMES[int(probability > threshold)]
        with Image.open(tmp_path / "out" / row["gradcam"]) as overlay:
            assert overlay.format == "PNG" and overlay.mode == "RGB"
            assert OVERLAY_SIDE[0] <= max(overlay.size) <= OVERLAY_SIDE[1]
            assert len(overlay.getcolors(maxcolors=1 << 20) or []) > 10  # a colour map, not a blank
        relative = Path(row["path"]).relative_to(mixed_folder)
        assert Path(row["gradcam"]) == Path("gradcam") / relative.with_name(relative.name + ".png")  # mirrors the input
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_probabilities_match_the_model_on_the_same_images(cnn_run: Path, tmp_path: Path) -> None:
    """PNG files of bundled test images get the probabilities the model gives the arrays themselves:
    the checkpoint's size and normalization are applied, whatever the file."""
    data = PneumoniaMNISTDataModule()
    data.setup()
    images = data.splits["test"].images[:12]
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(tmp_path / f"test_{i:02d}.png")
    module = load_classifier(cnn_run / "checkpoints" / "best.ckpt")
    prep = module.hparams.preprocessing
    expected = module.predict_probabilities(normalize(images, prep["mean"], prep["std"])).tolist()
    rows = read_rows(predict_in(tmp_path / "out", cnn_run / "checkpoints" / "best.ckpt", tmp_path))
    assert [float(r["probability_pneumonia"]) for r in rows] == pytest.approx(expected, abs=2e-6)


def bundled_xray(index: int, side: int = 112) -> np.ndarray:
    """A bundled PneumoniaMNIST test image upscaled to `side` px: an X-ray at a file's resolution."""
    data = PneumoniaMNISTDataModule()
    data.setup()
    small = Image.fromarray(data.splits["test"].images[index, 0].numpy())
    return np.asarray(small.resize((side, side), Image.Resampling.BICUBIC))


def test_one_xray_in_four_formats_gets_one_probability(cnn_run: Path, tmp_path: Path) -> None:
    """An 8-bit PNG, a 12-bit PNG (no sBIT chunk), a MONOCHROME2 and a MONOCHROME1 DICOM of the same X-ray."""
    for index in (0, 1, 2, 3):  # NORMAL and PNEUMONIA images of the bundled test split
        picture = bundled_xray(index)
        Image.fromarray(picture).save(tmp_path / f"xray{index}_png8.png")
        Image.fromarray(at_depth(picture, 12)).save(tmp_path / f"xray{index}_png12.png")
        write_dicom(tmp_path / f"xray{index}_dicom_mono2.dcm", at_depth(picture, 12), 12)
        write_dicom(tmp_path / f"xray{index}_dicom_mono1.dcm", 4095 - at_depth(picture, 12), 12, "MONOCHROME1")
    rows = read_rows(predict_in(tmp_path / "out", cnn_run / "checkpoints" / "best.ckpt", tmp_path))
    by_xray: dict[str, dict[str, float]] = {}
    for row in rows:
        xray, kind = Path(row["path"]).stem.split("_", 1)
        by_xray.setdefault(xray, {})[kind] = float(row["probability_pneumonia"])
    print("probability of PNEUMONIA per format:")  # quoted in the README
    for xray, probabilities in sorted(by_xray.items()):
        print(f"  {xray}: " + ", ".join(f"{kind} {p:.4f}" for kind, p in sorted(probabilities.items())))
    assert len(by_xray) == 4
    for probabilities in by_xray.values():
        assert len(probabilities) == 4
        assert max(probabilities.values()) - min(probabilities.values()) < 0.02


def with_geometry(ckpt: Path, target: Path, geometry: str | None) -> Path:
    """A copy of `ckpt` whose preprocessing records `geometry`, or, for None, nothing (as older versions)."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    prep = checkpoint["hyper_parameters"]["preprocessing"]
    prep.pop("geometry", None)
    if geometry is not None:
        prep["geometry"] = geometry
    torch.save(checkpoint, target)
    return target


def test_images_are_fitted_as_the_checkpoint_was_trained(cnn_run: Path, tmp_path: Path, caplog) -> None:
    """A wide X-ray with bright bands beside it: a model trained with crop never sees the bands; one
    trained with stretch (or an older checkpoint) sees the whole image squeezed."""
    ckpt = cnn_run / "checkpoints" / "best.ckpt"
    assert load_classifier(ckpt).hparams.preprocessing["geometry"] == "crop"  # the bundled data's default
    picture = bundled_xray(5, side=84)
    banded = np.full((84, 168), 250, np.uint8)
    banded[:, 42:126] = picture
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(picture).save(folder / "core.png")
    Image.fromarray(banded).save(folder / "banded.png")
    Image.fromarray(banded).resize((28, 28), Image.Resampling.BILINEAR).save(folder / "squeezed.png")

    def probabilities(checkpoint: Path, out: str) -> dict[str, float]:
        rows = read_rows(predict_in(tmp_path / out, checkpoint, folder))
        return {Path(r["path"]).stem: float(r["probability_pneumonia"]) for r in rows}

    cropped = probabilities(ckpt, "crop")
    assert cropped["banded"] == pytest.approx(cropped["core"], abs=1e-6)
    stretched = probabilities(with_geometry(ckpt, tmp_path / "stretch.ckpt", "stretch"), "stretch")
    assert stretched["banded"] == pytest.approx(cropped["squeezed"], abs=1e-6)
    caplog.set_level("INFO", logger="xray_cls.data")
    older = probabilities(with_geometry(ckpt, tmp_path / "older.ckpt", None), "older")
    assert older == stretched
    assert "records no preprocessing geometry" in caplog.text and "stretched to a square" in caplog.text


def test_one_image_through_the_cli(cnn_run: Path, tmp_path: Path) -> None:
    image = tmp_path / "patient 7.jpeg"  # a space in the name, as users have
    write_image(image.with_suffix(""), label=1, index=1)  # index 1 writes an RGB .jpeg
    out = tmp_path / "out"
    result = run_cli(
        [f"ckpt={cnn_run / 'checkpoints' / 'best.ckpt'}", f"input='{image}'", "gradcam=true", f"hydra.run.dir={out}"],
        cwd=tmp_path, module="xray_cls.predict",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = read_rows(out / "predictions.csv")
    assert row["path"] == str(image) and (out / row["gradcam"]).is_file()


def test_an_existing_prediction_is_never_overwritten(cnn_run: Path, mixed_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("earlier results\n")
    with pytest.raises(UserInputError, match="already holds predictions"):
        predict_in(out, cnn_run / "checkpoints" / "best.ckpt", mixed_folder)
    assert (out / "predictions.csv").read_text() == "earlier results\n"


def _junk_only(folder: Path) -> Path:
    folder.mkdir()
    (folder / ".DS_Store").write_bytes(b"\x00")
    (folder / "readme.txt").write_text("x")
    return folder


def _not_an_image(folder: Path) -> Path:
    path = folder / "scan.png"
    path.write_text("plain text with a .png name")
    return path


BAD_INPUTS = {
    "missing": (lambda tmp: tmp / "nowhere", "does not exist"),
    "empty folder": (lambda tmp: _junk_only(tmp / "empty"), "holds no images"),
    "not an image": (_not_an_image, "is not a readable image"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_named_and_leaves_no_csv(case: str, cnn_run: Path, tmp_path: Path) -> None:
    make, expected = BAD_INPUTS[case]
    input_path = make(tmp_path)
    with pytest.raises(UserInputError) as caught:
        predict_in(tmp_path / "out", cnn_run / "checkpoints" / "best.ckpt", input_path)
    assert str(input_path) in str(caught.value) and expected in str(caught.value)
    assert not (tmp_path / "out" / "predictions.csv").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_gradcam_of_a_network_without_convolutions_is_refused(mlp_run: Path, mixed_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="gradcam=true needs a network with convolution layers.*MLP"):
        predict_in(tmp_path / "out", mlp_run / "checkpoints" / "best.ckpt", mixed_folder, "gradcam=true")


def _without_root_privileges() -> list[str] | None:
    """A command prefix under which file permissions bind: [] when not root; for root, a new user
    namespace (root keeps its files' owner bits but loses the power to override them)."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--user", "true"], capture_output=True).returncode != 0:
        return None
    return [unshare, "--user"]


def test_an_image_without_read_permission_is_named(cnn_run: Path, tmp_path: Path) -> None:
    prefix = _without_root_privileges()
    if prefix is None:
        pytest.skip("running as root and `unshare --user` is unavailable: root reads any file")
    image = tmp_path / "locked.png"
    write_image(image.with_suffix(""), label=0, index=0)  # index 0 writes a .png
    image.chmod(0o000)
    ckpt = cnn_run / "checkpoints" / "best.ckpt"
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "xray_cls.predict", f"ckpt={ckpt}", f"input={image}", f"hydra.run.dir={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"error: input={image} is not a readable image ([Errno 13] Permission denied: '{image}')"
    assert not (out / "predictions.csv").exists()


def test_a_missing_option_is_named(tmp_path: Path) -> None:
    result = run_cli(["ckpt=model.ckpt"], cwd=tmp_path, module="xray_cls.predict")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: input is not set; expected input=/path/to/image_or_folder"
