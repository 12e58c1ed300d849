"""Fuzzing the image readers (PNG, JPEG, DICOM) through `python -m xray_cls.predict`, as a user
meets them: one mutated image in an input folder (see tests/fuzzing.py)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from conftest import write_dicom
from fuzzing import (
    CaseServer,
    Fixture,
    assert_handled,
    assert_writes_only_in,
    case_folders,
    dicom_layout,
    fix_png_crcs,
    fuzz_cases,
    fuzz_settings,
    jpeg_layout,
    mutate,
    mutations,
    png_layout,
    snapshot,
    written,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]


def picture(height: int = 40, width: int = 48, seed: int = 0) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).normal(120, 40, (height, width)), 0, 255).astype(np.uint8)


def encoded(image: Image.Image, kind: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def png_fixtures() -> dict[str, bytes]:
    gray = picture()
    return {
        "gray8": encoded(Image.fromarray(gray), "PNG"),
        "gray16": encoded(Image.fromarray((gray.astype(np.uint16) * 16)), "PNG"),
        "rgba": encoded(Image.fromarray(np.stack([gray] * 3 + [np.full_like(gray, 255)], -1), "RGBA"), "PNG"),
        "palette": encoded(Image.fromarray(gray).convert("P"), "PNG"),
        "interlaced": encoded(Image.fromarray(gray), "PNG", interlace=1),
    }


def jpeg_fixtures() -> dict[str, bytes]:
    gray = picture()
    return {
        "gray": encoded(Image.fromarray(gray), "JPEG", quality=90),
        "rgb": encoded(Image.fromarray(np.stack([gray] * 3, -1)), "JPEG", quality=90),
        "progressive": encoded(Image.fromarray(gray), "JPEG", quality=90, progressive=True),
    }


def dicom_fixtures(folder: Path) -> dict[str, Path]:
    gray = picture().astype(np.uint16) * 16
    return {
        "12bit": write_dicom(folder / "12bit.dcm", gray, 12),
        "monochrome1": write_dicom(folder / "mono1.dcm", gray, 12, "MONOCHROME1"),
        "windowed": write_dicom(folder / "window.dcm", gray, 12, WindowCenter=2000, WindowWidth=3000),
        "8bit": write_dicom(folder / "8bit.dcm", picture(), 8),
    }


@pytest.fixture(scope="module")
def checkpoint(cnn_run: Path) -> Path:
    """A short CNN run's best checkpoint (conftest's): what predict reads the images with."""
    return cnn_run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Fixture]:
    found = {}
    for name, data in png_fixtures().items():
        found[f"png-{name}"] = Fixture(data, png_layout(data), after=fix_png_crcs)
    for name, data in jpeg_fixtures().items():
        found[f"jpeg-{name}"] = Fixture(data, jpeg_layout(data))
    for name, path in dicom_fixtures(tmp_path_factory.mktemp("dicom")).items():
        found[f"dicom-{name}"] = Fixture(path.read_bytes(), dicom_layout(path))
    return found


SUFFIX = {"png": ".png", "jpeg": ".jpeg", "dicom": ".dcm"}


def check_prediction(out: Path, image: Path) -> None:
    """A correct result: one row for the image, a probability in [0, 1], a class of the model."""
    with (out / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == [str(image)]
    probability = float(rows[0]["probability_pneumonia"])
    assert 0.0 <= probability <= 1.0
    assert rows[0]["predicted_label"] in ("NORMAL", "PNEUMONIA")


def test_every_fixture_predicts_unmutated(case_server: CaseServer, checkpoint: Path, fixtures: dict[str, Fixture], tmp_path: Path) -> None:
    """The fixtures themselves are valid: every one is predicted (else the fuzzer would only test refusals)."""
    cases = case_folders(tmp_path)
    for name, fixture in fixtures.items():
        case = next(cases)
        image = written(case / "input" / f"image{SUFFIX[name.split('-')[0]]}", fixture.data)
        outcome = case_server.run("xray_cls.predict", [f"ckpt={checkpoint}", f"input={case / 'input'}", f"hydra.run.dir={case / 'out'}"], case)
        assert outcome.exit == 0, name + "\n" + outcome.describe()
        check_prediction(case / "out", image)


def test_mutated_images_are_predicted_or_refused_in_one_line(case_server: CaseServer, checkpoint: Path, fixtures: dict[str, Fixture],
                                                              tmp_path: Path, pytestconfig: pytest.Config) -> None:
    folders = case_folders(tmp_path)

    @fuzz_settings(fuzz_cases(pytestconfig, 40))
    @given(data=st.data())
    def one_case(data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(fixtures)), label="fixture")
        fixture = fixtures[name]
        ops = data.draw(mutations(fixture.data, fixture.layout), label="mutations")
        mutated = mutate(fixture.data, ops)
        if fixture.after is not None and data.draw(st.booleans(), label="checksums fixed"):
            mutated = fixture.after(mutated)
        case = next(folders)
        image = written(case / "input" / f"image{SUFFIX[name.split('-')[0]]}", mutated)
        before = snapshot(case)
        outcome = case_server.run("xray_cls.predict", [f"ckpt={checkpoint}", f"input={case / 'input'}", f"hydra.run.dir={case / 'out'}"], case)
        assert_writes_only_in(before, snapshot(case), case, case / "out")
        if assert_handled(outcome, names=None):
            check_prediction(case / "out", image)
        else:
            assert not (case / "out" / "predictions.csv").exists()
            assert "image" in outcome.stderr, outcome.describe()  # the unreadable file is named

    one_case()
