"""A run's checkpoint carries what a trained model needs, and foreign or broken files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from xray_cls.checkpoint import load_classifier, read_checkpoint
from xray_cls.data import PneumoniaMNISTDataModule, normalize
from xray_cls.errors import UserInputError


def test_checkpoint_carries_preprocessing_and_the_chosen_threshold(cnn_run: Path) -> None:
    metrics = json.loads((cnn_run / "metrics.json").read_text())
    hparams = read_checkpoint(cnn_run / "checkpoints" / "best.ckpt")["hyper_parameters"]
    assert metrics["threshold_rule"]["rule"] == "youden"
    assert hparams["threshold"] == metrics["threshold"] != 0.5
    assert hparams["threshold_rule"] == metrics["threshold_rule"]
    data = PneumoniaMNISTDataModule()
    data.setup()
    assert hparams["preprocessing"] == {
        "image_size": 28, "in_channels": 1, "mean": data.mean, "std": data.std, "class_names": ["NORMAL", "PNEUMONIA"],
        "geometry": "crop",
    }


def test_loaded_classifier_reproduces_the_runs_test_matrix(cnn_run: Path) -> None:
    metrics = json.loads((cnn_run / "metrics.json").read_text())
    module = load_classifier(cnn_run / "checkpoints" / "best.ckpt")
    prep = module.hparams.preprocessing
    data = PneumoniaMNISTDataModule()
    data.setup()
    test = data.splits["test"]
    called = module.predict_probabilities(normalize(test.images, prep["mean"], prep["std"])) > module.hparams.threshold
    positive = test.labels.bool()
    matrix = [[int((~called & ~positive).sum()), int((called & ~positive).sum())],
              [int((~called & positive).sum()), int((called & positive).sum())]]
    assert matrix == metrics["confusion_matrix"]["matrix"]


def _truncated(run: Path, path: Path) -> None:
    data = (run / "checkpoints" / "best.ckpt").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _foreign_state_dict(run: Path, path: Path) -> None:
    torch.save({"weight": torch.zeros(3)}, path)


def _foreign_target(run: Path, path: Path) -> None:
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["net"]["_target_"] = "os.system"
    torch.save(checkpoint, path)


class RunsCode:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _code_in_pickle(run: Path, path: Path) -> None:
    torch.save({"state_dict": {}, "payload": RunsCode(path.with_suffix(".pwned"))}, path)


BAD_CHECKPOINTS = {
    "missing": (lambda run, path: None, "does not exist"),
    "folder": (lambda run, path: path.mkdir(), "is a folder"),
    "not a checkpoint": (lambda run, path: path.write_text("hello"), "is not a readable checkpoint"),
    "truncated": (_truncated, "is not a readable checkpoint"),
    "foreign state dict": (_foreign_state_dict, "not an xray_cls checkpoint"),
    "foreign network target": (_foreign_target, "not an xray_cls checkpoint"),
    "pickled code": (_code_in_pickle, "is not a readable checkpoint"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoints_are_refused_with_their_path(case: str, cnn_run: Path, tmp_path: Path) -> None:
    make, expected = BAD_CHECKPOINTS[case]
    path = tmp_path / "model.ckpt"
    make(cnn_run, path)
    with pytest.raises(UserInputError) as caught:
        load_classifier(path)
    assert str(path) in str(caught.value) and expected in str(caught.value)
    assert not path.with_suffix(".pwned").exists()  # weights_only loading ran no pickled code


def test_pickled_code_would_run_without_weights_only(tmp_path: Path) -> None:
    """The check above is meaningful: the same file does run code when loaded the unsafe way."""
    path = tmp_path / "model.ckpt"
    _code_in_pickle(Path(), path)
    torch.load(path, weights_only=False)
    assert path.with_suffix(".pwned").exists()


def test_cli_reports_a_corrupt_checkpoint_in_one_line(cnn_run: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "best.ckpt"
    _truncated(cnn_run, ckpt)
    result = run_cli([f"ckpt={ckpt}", f"input={tmp_path}"], cwd=tmp_path, module="xray_cls.predict")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: ckpt={ckpt} is not a readable checkpoint")
    assert "Traceback" not in result.stderr


def test_record_threshold_leaves_no_temporary_file(cnn_run: Path) -> None:
    assert sorted(p.name for p in (cnn_run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
