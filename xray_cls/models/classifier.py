"""The LightningModule that trains any network of `xray_cls.models.networks`: a binary classifier (one
logit, sigmoid, a threshold) for two classes, a softmax classifier (one logit per class, the most
probable class) for three or more."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import CatMetric, MeanMetric, Metric, MetricCollection
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
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassPrecisionRecallCurve,
    MulticlassRecall,
    MulticlassROC,
    MulticlassSpecificity,
)
from torchmetrics.utilities import dim_zero_cat

from xray_cls.core.errors import TrainingDivergedError
from xray_cls.metrics.calibration import probabilities
from xray_cls.metrics.val_choices import ValChoices
from xray_cls.models.networks import build_network


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
        n = len(labels)
        if probs.dim() == 2:  # K classes: the most probable one; soft (mixup) labels: their largest share
            correct = (probs.argmax(1) == (labels.argmax(1) if labels.dim() == 2 else labels)).sum()
        else:
            correct = ((probs > self.threshold) == (labels > 0.5)).sum()  # soft labels: their majority class
        self.sums.add_(torch.stack([loss.detach().float() * n, correct.float(), torch.full_like(self.sums[0], n)]))

    def compute(self) -> dict[str, Tensor]:
        loss_sum, correct, count = self.sums
        return {"loss": loss_sum / count, "acc": correct / count}


def test_metrics(num_classes: int, threshold: float) -> tuple[MetricCollection, Metric, Metric, Metric]:
    """(scores, confusion matrix, ROC, precision-recall curve) of a test split. For K classes the
    scores are macro averages over the classes (accuracy: over the images), under the binary names."""
    if num_classes == 2:
        scores = {
            "accuracy": BinaryAccuracy(threshold=threshold),
            "precision": BinaryPrecision(threshold=threshold),
            "recall": BinaryRecall(threshold=threshold),
            "specificity": BinarySpecificity(threshold=threshold),
            "f1": BinaryF1Score(threshold=threshold),
            "auroc": BinaryAUROC(),
        }
        return MetricCollection(scores), BinaryConfusionMatrix(threshold=threshold), BinaryROC(), BinaryPrecisionRecallCurve()
    k = num_classes
    scores = {
        "accuracy": MulticlassAccuracy(k, average="micro"),
        "precision": MulticlassPrecision(k, average="macro"),
        "recall": MulticlassRecall(k, average="macro"),
        "specificity": MulticlassSpecificity(k, average="macro"),
        "f1": MulticlassF1Score(k, average="macro"),
        "auroc": MulticlassAUROC(k, average="macro"),
    }
    return MetricCollection(scores), MulticlassConfusionMatrix(k), MulticlassROC(k), MulticlassPrecisionRecallCurve(k)


class XrayClassifier(L.LightningModule):
    """Two classes: one logit per image, the second class (PNEUMONIA) being the positive one.
    K >= 3 classes (`net["num_classes"]`): K logits, a softmax, cross-entropy; an image is called
    its most probable class, and the threshold is not used.

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
        class_weight: list[float] | None = None,  # K >= 3 classes: each class's weight in the loss
        fine_tuning: dict[str, Any] | None = None,  # a pretrained backbone's freeze_epochs and backbone_lr_scale
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run logs its own curated hparams
        self.net: nn.Module = build_network(net)
        self.num_classes = int(net.get("num_classes", 2))
        if self.num_classes == 2:
            # pos_weight < 1 weighs PNEUMONIA, the majority class here, down (see conf/train.yaml: loss).
            self.loss: nn.Module = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight]) if pos_weight else None)
        else:
            self.loss = nn.CrossEntropyLoss(weight=torch.tensor(class_weight, dtype=torch.float32) if class_weight else None)
        # Epoch-level metrics are updated every step and logged once an epoch: self.log() on every
        # step costs Lightning about a millisecond, as much as a whole step of the MLP.
        threshold = float(threshold)  # torchmetrics takes a float, and a checkpoint may hold 0 or 1
        self.train_stats, self.val_stats = LossAccuracy(threshold), LossAccuracy(threshold)
        self.val_auroc = (BinaryAUROC(validate_args=False) if self.num_classes == 2
                          else MulticlassAUROC(self.num_classes, average="macro", validate_args=False))
        self.test_loss = MeanMetric()
        self.test_scores, self.test_confusion, self.test_roc, self.test_pr_curve = test_metrics(self.num_classes, threshold)
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

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    def predict_probabilities(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Calibrated probabilities for preprocessed images: of the positive class (N,), or of each class (N, K)."""
        return probabilities(self.predict_logits(images, batch_size), self.temperature)

    def decisions(self, probs: Tensor, threshold: float | None = None) -> Tensor:
        """The class each image is called, by its probabilities: above the threshold (this
        classifier's, or `threshold`), or the most probable."""
        if probs.dim() == 2:
            return probs.argmax(1)
        return (probs.double() > (self.threshold if threshold is None else threshold)).long()  # the threshold's own precision

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
        targets = labels.float() if self.binary else labels
        return self.loss(logits, targets), probabilities(logits), labels

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch  # labels are soft (float; (N, K) for K classes) under data.mixup
        logits = self(images).float()
        if self.binary:
            targets = labels.float() * (1 - self.label_smoothing) + self.label_smoothing / 2
            loss = self.loss(logits, targets)
        else:
            loss = F.cross_entropy(logits, labels, weight=self.loss.weight, label_smoothing=self.label_smoothing)
        self.train_stats.update(loss, probabilities(logits), labels)  # accuracy against the labels, not the smoothed targets
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
        fpr, tpr, _ = self.test_roc.compute()  # K classes: one curve per class, one vs the rest
        precision, recall, _ = self.test_pr_curve.compute()
        with self.test_roc.sync_context():  # every process's predictions, for the bootstrap
            probs, labels = dim_zero_cat(self.test_roc.preds), dim_zero_cat(self.test_roc.target)
        self.test_results = {
            "probs": probs.cpu(),
            "labels": labels.cpu(),
            "scores": scores,
            "confusion_matrix": self.test_confusion.compute().tolist(),  # [[TN, FP], [FN, TP]]; K x K: rows true
            "roc": (on_cpu(fpr), on_cpu(tpr)),
            "pr_curve": (on_cpu(precision), on_cpu(recall)),
            # uncalibrated, in the order of probs: (N,), or (N, K)
            "logits": self.test_logits.compute().reshape(len(labels), -1).squeeze(1).cpu(),
        }
        for metric in (self.test_loss, self.test_scores, self.test_confusion, self.test_roc, self.test_pr_curve, self.test_logits):
            metric.reset()

    def configure_optimizers(self) -> Any:
        if not self.hparams.optimizer:
            raise ValueError("this classifier was loaded to evaluate or predict, without an optimizer; it cannot train")
        from xray_cls.models.pretrained import parameter_groups

        params = parameter_groups(self, self.hparams.get("fine_tuning"), float(self.hparams.optimizer.get("lr", math.nan)))
        optimizer = instantiate(self.hparams.optimizer)(params)
        if not self.hparams.scheduler:
            return optimizer
        scheduler_cfg = dict(self.hparams.scheduler)
        interval = scheduler_cfg.pop("interval", "epoch")
        scheduler = instantiate(scheduler_cfg)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


def on_cpu(curve: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
    return [c.cpu() for c in curve] if isinstance(curve, list) else curve.cpu()
