"""The LightningModule's own metric and its guard against a diverging run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SHORT_RUN, compose_config
from torchmetrics.classification import BinaryAccuracy

from xray_cls.classifier import LossAccuracy
from xray_cls.errors import TrainingDivergedError
from xray_cls.train import train


def test_loss_accuracy_matches_torchmetrics_over_uneven_batches() -> None:
    torch.manual_seed(0)
    stats, reference = LossAccuracy(threshold=0.3), BinaryAccuracy(threshold=0.3)
    losses, sizes = [], []
    for size in (32, 32, 7):
        probs, labels = torch.rand(size), torch.randint(0, 2, (size,))
        loss = torch.rand(())
        stats.update(loss, probs, labels)
        reference.update(probs, labels)
        losses.append(loss.item())
        sizes.append(size)
    result = stats.compute()
    assert result["acc"].item() == pytest.approx(reference.compute().item(), abs=1e-6)
    expected_loss = sum(l * n for l, n in zip(losses, sizes)) / sum(sizes)
    assert result["loss"].item() == pytest.approx(expected_loss, rel=1e-5)


def test_a_diverging_run_stops_with_a_clear_error(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, [*SHORT_RUN, "optimizer.lr=1e30"])
    with pytest.raises(TrainingDivergedError, match="training loss is nan in epoch 0; try a lower optimizer.lr"):
        train(cfg)
