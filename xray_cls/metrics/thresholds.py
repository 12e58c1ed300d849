"""The decision threshold chosen on validation predictions, by a rule (fixed, youden,
youden_neutral, sensitivity)."""

from __future__ import annotations

from typing import Any

import torch

from xray_cls.metrics.options import THRESHOLD_RULES

NEUTRAL_THRESHOLD = 0.5  # where the (weighted) loss is indifferent between the classes


def choose_threshold(
    rule: str, probs: torch.Tensor, labels: torch.Tensor, fixed: float, target_sensitivity: float
) -> dict[str, Any]:
    """The decision threshold by `rule`, from validation predictions, with the val sensitivity and
    specificity at it. An image is called PNEUMONIA when its probability is above the threshold.

    fixed: `fixed`. youden: the one maximizing sensitivity + specificity - 1 (Youden's J).
    youden_neutral: of the thresholds whose J is within one image of the best (1 / the smaller
    class's count), the one nearest NEUTRAL_THRESHOLD. sensitivity: the highest one whose
    sensitivity is at least `target_sensitivity` (the best specificity there).
    """
    from xray_cls.core.options import check_choice, check_number

    check_choice("threshold_rule", rule, THRESHOLD_RULES, "known")
    check_number("target_sensitivity", target_sensitivity, 0, 1, low_open=True)
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
    elif rule == "youden_neutral":
        # A val split the network all but separates leaves a wide band of thresholds a single image
        # apart, and argmax lands anywhere in it (0.03 to 0.5 across seeds); val cannot tell them
        # apart, so take the one that leans on neither class.
        j = sensitivity + specificity
        smaller_class = min(int(positive.sum()), int((~positive).sum()))
        one_image = 1 / smaller_class if smaller_class else 0.0
        near_best = torch.nonzero(j >= j.max() - one_image - 1e-6).flatten()  # float32 rates
        best = int(near_best[torch.argmin((candidates[near_best] - NEUTRAL_THRESHOLD).abs())])
    else:  # sensitivity falls as the threshold rises: take the last one that still reaches the target
        best = int(torch.nonzero(sensitivity >= target_sensitivity).max())
    threshold, sens, spec = candidates[best].item(), sensitivity[best].item(), specificity[best].item()
    return {"rule": rule, "threshold": threshold, "val_sensitivity": sens, "val_specificity": spec}
