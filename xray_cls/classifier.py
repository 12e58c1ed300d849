"""The LightningModule that trains any network of `xray_cls.networks` as a binary classifier."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryConfusionMatrix,
    BinaryF1Score,
    BinaryPrecision,
    BinaryPrecisionRecallCurve,
    BinaryRecall,
    BinaryROC,
    BinarySpecificity,
)

from xray_cls.errors import TrainingDivergedError


class XrayClassifier(L.LightningModule):
    """One logit per image, PNEUMONIA being the positive class.

    The network, optimizer and scheduler are given as Hydra configs (`_target_` dicts) rather than
    objects, so that a checkpoint holds plain data and rebuilds the whole model by itself.
    """

    def __init__(
        self,
        net: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run logs its own curated hparams
        self.net: nn.Module = instantiate(net)
        self.loss = nn.BCEWithLogitsLoss()
        self.train_acc = BinaryAccuracy(threshold=threshold)
        self.val_acc = BinaryAccuracy(threshold=threshold)
        self.val_auroc = BinaryAUROC()
        self.test_scores = MetricCollection(
            {
                "accuracy": BinaryAccuracy(threshold=threshold),
                "precision": BinaryPrecision(threshold=threshold),
                "recall": BinaryRecall(threshold=threshold),
                "specificity": BinarySpecificity(threshold=threshold),
                "f1": BinaryF1Score(threshold=threshold),
                "auroc": BinaryAUROC(),
            }
        )
        self.test_confusion = BinaryConfusionMatrix(threshold=threshold)
        self.test_roc = BinaryROC()
        self.test_pr_curve = BinaryPrecisionRecallCurve()
        self.test_results: dict[str, Any] = {}

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def _step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        images, labels = batch
        logits = self(images)
        return self.loss(logits, labels.float()), torch.sigmoid(logits), labels

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, probs, labels = self._step(batch)
        self.train_acc(probs, labels)
        self.log("loss/train", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("acc/train", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        # Checked once an epoch, not every step: a per-step check would sync the GPU each batch.
        loss = self.trainer.callback_metrics.get("loss/train")
        if loss is not None and not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"training loss is {loss.item()} in epoch {self.current_epoch}; "
                "try a lower optimizer.lr or check the data"
            )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, probs, labels = self._step(batch)
        self.val_acc(probs, labels)
        self.val_auroc(probs, labels)
        self.log("loss/val", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("acc/val", self.val_acc, on_epoch=True, prog_bar=True)
        self.log("auroc/val", self.val_auroc, on_epoch=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, probs, labels = self._step(batch)
        for metric in (self.test_scores, self.test_confusion, self.test_roc, self.test_pr_curve):
            metric.update(probs, labels)
        self.log("loss/test", loss, on_epoch=True, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        # compute() reduces across processes, so every figure below covers the whole test set once.
        scores = {name: value.item() for name, value in self.test_scores.compute().items()}
        self.log_dict({f"test/{name}": value for name, value in scores.items()})
        fpr, tpr, _ = self.test_roc.compute()
        precision, recall, _ = self.test_pr_curve.compute()
        self.test_results = {
            "scores": scores,
            "confusion_matrix": self.test_confusion.compute().tolist(),  # [[TN, FP], [FN, TP]]
            "roc": (fpr.cpu(), tpr.cpu()),
            "pr_curve": (precision.cpu(), recall.cpu()),
        }
        for metric in (self.test_scores, self.test_confusion, self.test_roc, self.test_pr_curve):
            metric.reset()

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer)(self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        scheduler_cfg = dict(self.hparams.scheduler)
        interval = scheduler_cfg.pop("interval", "epoch")
        scheduler = instantiate(scheduler_cfg)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
