"""Everything a run chooses (checkpoint, threshold, temperature) is chosen on val: corrupting the
test labels changes the test figures and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xray_cls.data.pneumoniamnist import BUNDLED_NPZ
from xray_cls.train import train

from conftest import SHORT_RUN, compose_config

CHOICES = ["model=mlp", "threshold_rule=youden", "calibration=temperature", "gradcam_samples=0", *SHORT_RUN]


def with_flipped_test_labels(path: Path) -> Path:
    """A copy of the bundled .npz whose test labels are all wrong."""
    with np.load(BUNDLED_NPZ) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["test_labels"] = 1 - arrays["test_labels"]
    np.savez(path, **arrays)
    return path


def test_corrupted_test_labels_change_no_choice(tmp_path: Path) -> None:
    clean = train(compose_config(tmp_path / "clean", CHOICES))
    corrupt_npz = with_flipped_test_labels(tmp_path / "flipped.npz")
    corrupt = train(compose_config(tmp_path / "corrupt", [*CHOICES, f"data.path={corrupt_npz}"]))

    assert corrupt["best_checkpoint"] == clean["best_checkpoint"]
    assert corrupt["threshold_rule"] == clean["threshold_rule"] and clean["threshold_rule"]["rule"] == "youden"
    assert corrupt["epochs"] == clean["epochs"]
    temperature = clean["calibration"]["temperature"]
    assert corrupt["calibration"]["temperature"] == temperature != 1.0
    assert corrupt["calibration"]["val_ece"] == clean["calibration"]["val_ece"]
    weights = [torch.load(tmp_path / run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
               for run in ("clean", "corrupt")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # the test did see the flipped labels: every call right on one set is wrong on the other
    assert corrupt["test"]["accuracy"] == pytest.approx(1 - clean["test"]["accuracy"], abs=1e-6)
    assert corrupt["test"]["auroc"] == pytest.approx(1 - clean["test"]["auroc"], abs=1e-6)
    (tn, fp), (fn, tp) = clean["confusion_matrix"]["matrix"]
    assert corrupt["confusion_matrix"]["matrix"] == [[fn, tp], [tn, fp]]
    assert json.loads((tmp_path / "corrupt" / "metrics.json").read_text())["threshold"] == clean["threshold"]
