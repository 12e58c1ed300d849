"""Percentile bootstrap intervals of the test scores, resampling the test images."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def bootstrap_intervals(
    probs: torch.Tensor, labels: torch.Tensor, threshold: float, resamples: int, confidence: float, seed: int
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of accuracy, sensitivity, specificity and AUROC, resampling
    the test images with replacement. For K classes (probs (N, K)): accuracy, and the macro
    averages of recall, specificity and one-vs-rest AUROC, as the test scores are."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(labels), (resamples, len(labels)), generator=generator)
    values = resampled_scores(probs[index], labels[index], threshold)
    tail = (1 - confidence) / 2
    levels = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    return {name: torch.quantile(v.double(), levels).tolist() for name, v in values.items()}


def resampled_scores(p: torch.Tensor, y: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """Each resample's scores, for resampled probabilities p (R, N) or (R, N, K) and labels y (R, N)."""
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

    if p.dim() == 2:
        y = y.bool()
        called = p > threshold  # torchmetrics' rule for a positive call
        return {
            "accuracy": (called == y).float().mean(1),
            "recall": (called & y).sum(1) / y.sum(1).clamp(min=1),
            "specificity": (~called & ~y).sum(1) / (~y).sum(1).clamp(min=1),
            "auroc": torch.stack([binary_auroc(p[i], y[i].long(), validate_args=False) for i in range(len(p))]),
        }
    k = p.shape[-1]
    called = F.one_hot(p.argmax(-1), k).bool()  # (R, N, K)
    truth = F.one_hot(y, k).bool()
    recall = (called & truth).sum(1) / truth.sum(1).clamp(min=1)  # (R, K)
    specificity = (~called & ~truth).sum(1) / (~truth).sum(1).clamp(min=1)
    return {
        "accuracy": (p.argmax(-1) == y).float().mean(1),
        "recall": recall.mean(1),
        "specificity": specificity.mean(1),
        "auroc": torch.stack([multiclass_auroc(p[i], y[i], k, average="macro", validate_args=False) for i in range(len(p))]),
    }
