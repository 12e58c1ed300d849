"""The LightningModule that trains any network of `xray_cls.networks` as a binary classifier."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torchmetrics import CatMetric, MeanMetric, Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat
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
from xray_cls.networks import build_network
from xray_cls.val_choices import ValChoices


class LossAccuracy(Metric):
    """Mean loss and accuracy over an epoch, kept in one state tensor.

    One in-place add per step: two separate torchmetrics objects cost several times as much, which
    shows on networks as small as the study's MLP. Reduced across processes like any metric.
    """

    full_state_update = False

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold
        self.add_state("sums", default=torch.zeros(3), dist_reduce_fx="sum")  # loss sum, correct, count

    def update(self, loss: Tensor, probs: Tensor, labels: Tensor) -> None:
        n = labels.numel()
        correct = ((probs > self.threshold) == (labels > 0.5)).sum()  # soft labels: their majority class
        self.sums.add_(torch.stack([loss.detach().float() * n, correct.float(), torch.full_like(self.sums[0], n)]))

    def compute(self) -> dict[str, Tensor]:
        loss_sum, correct, count = self.sums
        return {"loss": loss_sum / count, "acc": correct / count}


class XrayClassifier(L.LightningModule):
    """One logit per image, PNEUMONIA being the positive class.

    The network, optimizer and scheduler are given as Hydra configs (`_target_` dicts) rather than
    objects, so that a checkpoint holds plain data and rebuilds the whole model by itself. The
    network is built by `build_network`, which instantiates nothing inside its arguments; the
    optimizer and scheduler only by `configure_optimizers`, when training (None: a model loaded
    to evaluate or predict, which never trains).
    `preprocessing` (image_size, in_channels, mean, std of the train split) travels with it, so a
    trained model prepares new images as it was trained, whatever the current config says.
    `temperature` divides the logits of every probability it reports (test, predict, evaluate):
    1 unless the run fitted temperature scaling on val (calibration=temperature).
    """

    def __init__(
        self,
        net: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        threshold: float = 0.5,
        pos_weight: float | None = None,
        preprocessing: dict[str, Any] | None = None,
        threshold_rule: dict[str, Any] | None = None,  # how `threshold` was chosen, once it was
        temperature: float = 1.0,
        label_smoothing: float = 0.0,
        calibration: str = "none",  # how `temperature` was found (val_choices.ValChoices)
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run logs its own curated hparams
        self.net: nn.Module = build_network(net)
        # pos_weight < 1 weighs PNEUMONIA, the majority class here, down (see conf/train.yaml: loss).
        self.loss = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight]) if pos_weight else None)
        # Epoch-level metrics are updated every step and logged once an epoch: self.log() on every
        # step costs Lightning about a millisecond, as much as a whole step of the MLP.
        self.train_stats, self.val_stats = LossAccuracy(threshold), LossAccuracy(threshold)
        self.val_auroc = BinaryAUROC(validate_args=False)
        self.test_loss = MeanMetric()
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
        self.test_logits = CatMetric()
        self.test_results: dict[str, Any] = {}
        self.threshold = threshold
        self.temperature = float(temperature)
        self.label_smoothing = float(label_smoothing)

    @property
    def choices(self) -> ValChoices:
        """The threshold and temperature this classifier tests and predicts with."""
        return ValChoices.from_hparams(self.hparams)

    def apply_choices(self, choices: ValChoices) -> None:
        """Test, predict and export with `choices`: made on val after training, or given by the user."""
        self.threshold, self.temperature = choices.threshold, float(choices.temperature)
        self.hparams.update(choices.hparams())
        for metric in (*self.test_scores.values(), self.test_confusion):
            if hasattr(metric, "threshold"):
                metric.threshold = choices.threshold

    @torch.no_grad()
    def predict_logits(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Logits of preprocessed images before temperature scaling, in eval mode, batch by batch."""
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self.float32_logits(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        finally:
            self.train(was_training)

    def predict_probabilities(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Calibrated probabilities of PNEUMONIA for preprocessed images."""
        return torch.sigmoid(self.predict_logits(images, batch_size) / self.temperature)

    def on_fit_start(self) -> None:
        if self.device.type == "cuda":  # tensor cores want NHWC; the conv outputs follow the weights
            self.net.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def float32_logits(self, images: Tensor) -> Tensor:
        """Logits computed in float32 whatever the trainer's precision. Mixed precision speeds up
        training, but the test and predictions must come out the same on any machine: a bf16 run's
        test on a GPU and `evaluate` of its checkpoint on a CPU."""
        with torch.autocast(self.device.type, enabled=False):
            return self(images.to(self.dtype)).float()

    def _step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        images, labels = batch
        return self._scored(self(images).float(), labels)

    def _scored(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.loss(logits, labels.float()), torch.sigmoid(logits), labels

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch  # labels are soft (float) under data.mixup
        targets = labels.float() * (1 - self.label_smoothing) + self.label_smoothing / 2
        loss, probs, _ = self._scored(self(images).float(), targets)
        self.train_stats.update(loss, probs, labels)  # accuracy against the labels, not the smoothed targets
        return loss

    def on_train_epoch_end(self) -> None:
        stats = self.train_stats.compute()
        self.train_stats.reset()
        # Checked once an epoch, not every step: a per-step check would sync the GPU each batch.
        if not torch.isfinite(stats["loss"]):
            raise TrainingDivergedError(
                f"training loss is {stats['loss'].item()} in epoch {self.current_epoch}; "
                "try a lower optimizer.lr or check the data"
            )
        self.log_dict({"loss/train": stats["loss"], "acc/train": stats["acc"]}, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, probs, labels = self._step(batch)
        self.val_stats.update(loss, probs, labels)
        self.val_auroc.update(probs, labels)

    def on_validation_epoch_end(self) -> None:
        stats = self.val_stats.compute()
        self.log_dict({"loss/val": stats["loss"], "acc/val": stats["acc"]}, prog_bar=True)
        # The sanity check's few val batches may hold one class only (folder splits are ordered by
        # class): AUROC is undefined there and torchmetrics would warn. Its logs are dropped anyway.
        if not self.trainer.sanity_checking:
            self.log("auroc/val", self.val_auroc.compute())
        self.val_stats.reset()
        self.val_auroc.reset()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self.float32_logits(images)  # before temperature scaling: the test's uncalibrated ECE
        loss, probs, labels = self._scored(logits / self.temperature, labels)
        self.test_logits.update(logits)
        self.test_loss.update(loss, weight=len(labels))
        for metric in (self.test_scores, self.test_confusion, self.test_roc, self.test_pr_curve):
            metric.update(probs, labels)

    def on_test_epoch_end(self) -> None:
        # compute() reduces across processes, so every figure below covers the whole test set once.
        scores = {name: value.item() for name, value in self.test_scores.compute().items()}
        self.log_dict({f"test/{name}": value for name, value in scores.items()})
        self.log("loss/test", self.test_loss.compute())
        fpr, tpr, _ = self.test_roc.compute()
        precision, recall, _ = self.test_pr_curve.compute()
        with self.test_roc.sync_context():  # every process's predictions, for the bootstrap
            probs, labels = dim_zero_cat(self.test_roc.preds), dim_zero_cat(self.test_roc.target)
        self.test_results = {
            "probs": probs.cpu(),
            "labels": labels.cpu(),
            "scores": scores,
            "confusion_matrix": self.test_confusion.compute().tolist(),  # [[TN, FP], [FN, TP]]
            "roc": (fpr.cpu(), tpr.cpu()),
            "pr_curve": (precision.cpu(), recall.cpu()),
            "logits": self.test_logits.compute().reshape(-1).cpu(),  # uncalibrated, in the order of probs
        }
        for metric in (self.test_loss, self.test_scores, self.test_confusion, self.test_roc, self.test_pr_curve, self.test_logits):
            metric.reset()

    def configure_optimizers(self) -> Any:
        if not self.hparams.optimizer:
            raise ValueError("this classifier was loaded to evaluate or predict, without an optimizer; it cannot train")
        optimizer = instantiate(self.hparams.optimizer)(self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        scheduler_cfg = dict(self.hparams.scheduler)
        interval = scheduler_cfg.pop("interval", "epoch")
        scheduler = instantiate(scheduler_cfg)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
