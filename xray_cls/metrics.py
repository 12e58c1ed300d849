"""Metrics beyond torchmetrics' own: the decision threshold chosen on validation predictions, and
bootstrap confidence intervals of the test metrics."""

from __future__ import annotations

from typing import Any

import torch

THRESHOLD_RULES = ("fixed", "youden", "sensitivity")


def choose_threshold(
    rule: str, probs: torch.Tensor, labels: torch.Tensor, fixed: float, target_sensitivity: float
) -> dict[str, Any]:
    """The decision threshold by `rule`, from validation predictions, with the val sensitivity and
    specificity at it. An image is called PNEUMONIA when its probability is above the threshold.

    fixed: `fixed`. youden: the one maximizing sensitivity + specificity - 1. sensitivity: the
    highest one whose sensitivity is at least `target_sensitivity` (the best specificity there).
    """
    from xray_cls.errors import UserInputError

    if rule not in THRESHOLD_RULES:
        raise UserInputError(f"threshold_rule={rule!r} is not known; expected one of {', '.join(THRESHOLD_RULES)}")
    if not 0 < target_sensitivity <= 1:
        raise UserInputError(f"target_sensitivity={target_sensitivity!r} is not valid; expected a number in (0, 1]")
    if rule == "fixed":
        candidates = torch.tensor([float(fixed)], dtype=torch.float64)
    else:
        values = torch.unique(probs.double())  # sorted; cutting halfway between neighbours avoids ties
        candidates = torch.cat([values[:1] / 2, (values[1:] + values[:-1]) / 2, (values[-1:] + 1) / 2])
    positive = labels.bool()
    called = probs.double()[None, :] > candidates[:, None]
    sensitivity = (called & positive).sum(1) / positive.sum().clamp(min=1)
    specificity = (~called & ~positive).sum(1) / (~positive).sum().clamp(min=1)
    if rule == "fixed":
        best = 0
    elif rule == "youden":
        best = int(torch.argmax(sensitivity + specificity))
    else:  # sensitivity falls as the threshold rises: take the last one that still reaches the target
        best = int(torch.nonzero(sensitivity >= target_sensitivity).max())
    threshold, sens, spec = candidates[best].item(), sensitivity[best].item(), specificity[best].item()
    return {"rule": rule, "threshold": threshold, "val_sensitivity": sens, "val_specificity": spec}


def bootstrap_intervals(
    probs: torch.Tensor, labels: torch.Tensor, threshold: float, resamples: int, confidence: float, seed: int
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of accuracy, sensitivity, specificity and AUROC, resampling
    the test images with replacement."""
    from torchmetrics.functional.classification import binary_auroc

    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(labels), (resamples, len(labels)), generator=generator)
    p, y = probs[index], labels[index].bool()
    called = p > threshold  # torchmetrics' rule for a positive call
    values = {
        "accuracy": (called == y).float().mean(1),
        "recall": (called & y).sum(1) / y.sum(1).clamp(min=1),
        "specificity": (~called & ~y).sum(1) / (~y).sum(1).clamp(min=1),
        "auroc": torch.stack([binary_auroc(p[i], y[i].long(), validate_args=False) for i in range(resamples)]),
    }
    tail = (1 - confidence) / 2
    levels = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    return {name: torch.quantile(v.double(), levels).tolist() for name, v in values.items()}
