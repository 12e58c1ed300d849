"""Bad input on the command line: one `error:` line naming the input and what was expected, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xray_cls.data import BUNDLED_NPZ

from conftest import SHORT_RUN, run_cli

pytestmark = pytest.mark.slow  # every test runs the CLI


def assert_one_clear_error(args: list[str], cwd: Path, *expected: str) -> str:
    result = run_cli([*SHORT_RUN, f"hydra.run.dir={cwd / 'run'}", *args], cwd=cwd)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output, output[-3000:]
    for text in expected:
        assert text in result.stderr, result.stderr[-3000:]
    return result.stderr


def user_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_missing_data_root(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    stderr = assert_one_clear_error(["data=folder", f"data.root={missing}"], tmp_path, f"data.root: {missing} does not exist")
    assert "expected a folder with train/" in user_error_line(stderr)


def test_unset_data_root(tmp_path: Path) -> None:
    stderr = assert_one_clear_error(["data=folder"], tmp_path, "data.root is not set")
    user_error_line(stderr)


def test_folder_without_class_folders(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / "data" / split / "cats").mkdir(parents=True)
    stderr = assert_one_clear_error(
        ["data=folder", f"data.root={tmp_path / 'data'}"], tmp_path, "has no NORMAL folder", "['cats']"
    )
    user_error_line(stderr)


def test_corrupt_image_names_the_file(tmp_path: Path, kermany_root: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(kermany_root, root)
    bad = root / "test" / "PNEUMONIA" / "scan.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    stderr = assert_one_clear_error(["data=folder", f"data.root={root}"], tmp_path, f"{bad} is not a readable image")
    user_error_line(stderr)


def test_npz_missing_a_key(tmp_path: Path) -> None:
    path = tmp_path / "no_test.npz"
    arrays = dict(np.load(BUNDLED_NPZ))
    del arrays["test_images"], arrays["test_labels"]
    np.savez(path, **arrays)
    stderr = assert_one_clear_error([f"data.path={path}"], tmp_path, "lacks the key(s) test_images, test_labels")
    user_error_line(stderr)


def test_unknown_augmentation_preset(tmp_path: Path) -> None:
    stderr = assert_one_clear_error(["data.aug=extreme"], tmp_path, "expected one of none, mild, strong")
    user_error_line(stderr)


@pytest.mark.parametrize("value", ["0", "-8", "big"])
def test_image_size_not_a_positive_integer(tmp_path: Path, value: str) -> None:
    stderr = assert_one_clear_error([f"data.image_size={value}"], tmp_path, "expected a positive integer")
    user_error_line(stderr)


def test_unknown_model_lists_the_choices(tmp_path: Path) -> None:
    # Hydra's own message for a config group option that does not exist.
    assert_one_clear_error(["model=resnet9000"], tmp_path, "model/resnet9000", "cnn", "mlp")


@pytest.mark.parametrize("launcher", [["xray-cls"], [sys.executable, "-m", "xray_cls"]], ids=["console script", "python -m xray_cls"])
def test_the_console_script_runs_each_command_by_its_name(launcher: list[str], tmp_path: Path) -> None:
    """`xray-cls evaluate ...` is `python -m xray_cls.evaluate ...`; no command name is `train`."""
    if launcher[0] == "xray-cls" and shutil.which("xray-cls") is None:
        pytest.skip("the xray-cls script is not on PATH (pip install -e . puts it there)")
    evaluate = subprocess.run([*launcher, "evaluate"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert evaluate.returncode == 2 and user_error_line(evaluate.stderr) == "error: ckpt is not set; expected ckpt=outputs/<run>/checkpoints/best.ckpt"
    report = subprocess.run([*launcher, "sweep-report", str(tmp_path / "none")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert report.returncode == 2 and "is not a folder; expected a sweep folder" in user_error_line(report.stderr)
    train = subprocess.run([*launcher, "data.aug=strongest"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert train.returncode == 2 and user_error_line(train.stderr).startswith("error: data.aug='strongest' is not a known augmentation preset")
