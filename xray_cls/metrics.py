"""Metrics beyond torchmetrics' own: the decision threshold chosen on validation predictions, and
bootstrap confidence intervals of the test metrics."""

from __future__ import annotations

from typing import Any

import torch

from xray_cls.config import THRESHOLD_RULES

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
    from xray_cls.config import check_choice, check_number

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


CALIBRATION_BINS = 15  # equal-width bins of the predicted probability, for the ECE and the reliability diagram
TEMPERATURE_RANGE = (0.01, 100.0)  # a val split the model separates perfectly drives the fit to 0


def calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error of the probabilities of PNEUMONIA: the image-weighted mean gap,
    over equal-width bins, between the mean probability and the fraction of PNEUMONIA images."""
    from torchmetrics.functional.classification import binary_calibration_error

    return float(binary_calibration_error(probs.float(), labels.long(), n_bins=bins, norm="l1", validate_args=False))


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = CALIBRATION_BINS) -> dict[str, list]:
    """What a reliability diagram draws: per equal-width bin of the probability, its image count,
    mean probability and fraction of PNEUMONIA images (None in empty bins)."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    p, y = probs.double(), labels.double()
    index = (torch.bucketize(p, edges, right=True) - 1).clamp(0, bins - 1)  # 1.0 falls in the last bin
    count = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, torch.ones_like(p))
    prob_sum = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, p)
    positive = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, y)
    mean = [s / n if n else None for s, n in zip(prob_sum.tolist(), count.tolist())]
    fraction = [s / n if n else None for s, n in zip(positive.tolist(), count.tolist())]
    return {"edges": edges.tolist(), "count": [int(n) for n in count.tolist()], "mean_probability": mean, "fraction_positive": fraction}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): the T for which sigmoid(logits / T) has the lowest
    cross-entropy on these (val) labels, fitted by LBFGS on log T; kept within TEMPERATURE_RANGE."""
    import math

    x, y = logits.detach().double().flatten(), labels.detach().double().flatten()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TEMPERATURE_RANGE
    temperature = math.exp(log_t.item())
    return min(max(temperature, low), high) if math.isfinite(temperature) else high
