"""`python -m xray_cls.export`: the exported model gives the checkpoint's probabilities, in onnxruntime
and TorchScript, on the bundled test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xray_cls.core.errors import UserInputError
from xray_cls.data import BUNDLED_NPZ, normalize, read_npz
from xray_cls.export import export
from xray_cls.models.checkpoints import load_classifier

from conftest import compose_config, run_cli


def export_cli(ckpt: Path, out: Path, *args: str):
    return run_cli([f"ckpt={ckpt}", f"hydra.run.dir={out}", *args], cwd=out.parent, module="xray_cls.export")


def export_in(out: Path, ckpt: Path, *overrides: str) -> Path:
    return export(compose_config(out, [f"ckpt={ckpt}", *overrides], name="export"))


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    split = read_npz(BUNDLED_NPZ)["test"]
    return split.images.numpy(), split.labels.numpy()


def checkpoint_probabilities(ckpt: Path, images: np.ndarray) -> np.ndarray:
    module = load_classifier(ckpt)
    prep = module.hparams.preprocessing
    return module.predict_probabilities(normalize(torch.from_numpy(images), prep["mean"], prep["std"])).numpy()


def confusion_matrix(probs: np.ndarray, labels: np.ndarray, threshold: float) -> list[list[int]]:
    called = probs > threshold
    return [[int(((labels == t) & (called == p)).sum()) for p in (0, 1)] for t in (0, 1)]


def assert_same_as_checkpoint(run: Path, exported: np.ndarray, expected: np.ndarray, labels: np.ndarray, sidecar: dict) -> None:
    assert exported.shape == expected.shape == labels.shape
    difference = float(np.abs(exported - expected).max())
    print(f"max abs probability difference {difference:.2e} over {len(labels)} test images")
    assert difference < 1e-4
    metrics = json.loads((run / "metrics.json").read_text())
    assert sidecar["threshold"] == metrics["threshold"]  # the run's Youden threshold, from its checkpoint
    matrix = confusion_matrix(exported, labels, sidecar["threshold"])
    assert matrix == confusion_matrix(expected, labels, sidecar["threshold"]) == metrics["confusion_matrix"]["matrix"]
    assert sum(map(sum, matrix)) == len(labels) == 624


def test_onnx_export_matches_the_checkpoint_on_the_test_split(cnn_run: Path, tmp_path: Path, test_split) -> None:
    import onnxruntime

    ckpt = cnn_run / "checkpoints" / "best.ckpt"
    out = tmp_path / "export"
    result = export_cli(ckpt, out)
    assert result.returncode == 0, result.stderr[-3000:]
    sidecar = json.loads((out / "model.json").read_text())
    assert sidecar["model"] == "model.onnx" and (out / "model.onnx").is_file()
    assert sidecar["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert sidecar["image_size"] == 28 and sidecar["in_channels"] == 1
    assert sidecar["geometry"] in ("crop", "stretch")
    assert sidecar["input"]["dtype"] == "uint8"

    images, labels = test_split
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {sidecar["input"]["name"]: images})  # the whole split as one batch
    assert probs.dtype == np.float32
    assert_same_as_checkpoint(cnn_run, probs, checkpoint_probabilities(ckpt, images), labels, sidecar)
    (one,) = session.run(None, {"images": images[:1]})  # the batch size is free
    assert one.shape == (1,) and abs(one[0] - probs[0]) < 1e-6


def test_torchscript_export_matches_the_checkpoint(cnn_run: Path, tmp_path: Path, test_split) -> None:
    ckpt = cnn_run / "checkpoints" / "best.ckpt"
    model_path = export_in(tmp_path, ckpt, "format=torchscript")
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert model_path == tmp_path / sidecar["model"] == tmp_path / "model.pt"
    model = torch.jit.load(str(model_path))
    images, labels = test_split
    with torch.no_grad():
        probs = model(torch.from_numpy(images)).numpy()
    assert_same_as_checkpoint(cnn_run, probs, checkpoint_probabilities(ckpt, images), labels, sidecar)


def test_export_errors_name_the_bad_input(cnn_run: Path, tmp_path: Path) -> None:
    ckpt = cnn_run / "checkpoints" / "best.ckpt"
    with pytest.raises(UserInputError, match="format='tflite' is not known; expected one of onnx, torchscript"):
        export_in(tmp_path / "a", ckpt, "format=tflite")
    with pytest.raises(UserInputError, match="does not exist"):
        export_in(tmp_path / "b", tmp_path / "nope.ckpt")

    out = tmp_path / "c"
    export_in(out, ckpt, "format=torchscript")
    before = (out / "model.json").read_bytes()
    with pytest.raises(UserInputError, match="already holds an exported model"):  # nothing replaced
        export_in(out, ckpt)
    assert (out / "model.json").read_bytes() == before and not (out / "model.onnx").exists()


def test_the_docs_onnxruntime_example_gives_the_checkpoints_answer(
    cnn_run: Path, tmp_path: Path, test_split, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import re

    from PIL import Image

    ckpt = cnn_run / "checkpoints" / "best.ckpt"
    export_in(tmp_path, ckpt)
    images, _ = test_split
    Image.fromarray(images[0, 0]).save(tmp_path / "chest.png")  # lossless, at the model's size
    page = (Path(__file__).parents[1] / "docs" / "using-a-model.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", page, re.S)
    code = "\n".join(line.removeprefix("  ") for line in example.splitlines()).replace("chest.jpeg", "chest.png")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # only the example's own output below
    exec(compile(code, "docs/using-a-model.md", "exec"), {})
    label, probability = capsys.readouterr().out.split()
    expected = float(checkpoint_probabilities(ckpt, images[:1])[0])
    assert float(probability) == pytest.approx(expected, abs=1e-4)
    threshold = json.loads((tmp_path / "model.json").read_text())["threshold"]
    assert label == ("PNEUMONIA" if expected > threshold else "NORMAL")
