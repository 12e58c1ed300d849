"""Calibration: probabilities at a temperature, the expected calibration error, reliability bins,
and temperature scaling fitted on val."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Calibrated probabilities of logits: of the positive class, (N,), for two classes' one logit;
    of each class, (N, K), for K >= 3 classes' logits."""
    scaled = logits / temperature
    return torch.sigmoid(scaled) if scaled.dim() == 1 else torch.softmax(scaled, dim=1)


CALIBRATION_BINS = 15  # equal-width bins of the predicted probability, for the ECE and the reliability diagram
TEMPERATURE_RANGE = (0.01, 100.0)  # a val split the model separates perfectly drives the fit to 0


def top_class(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What calibration is measured on: two classes' probabilities of the positive class and the
    labels as they are; K classes' top-class probability and whether that class is right (Guo et
    al. 2017's confidence and accuracy)."""
    if probs.dim() == 1:
        return probs, labels
    confidence, called = probs.max(1)
    return confidence, (called == labels).long()


def calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error: the image-weighted mean gap, over equal-width bins, between the
    mean probability and the fraction of positive images (K classes: of the top-class probability
    and the fraction called right)."""
    from torchmetrics.functional.classification import binary_calibration_error

    p, y = top_class(probs, labels)
    return float(binary_calibration_error(p.float(), y.long(), n_bins=bins, norm="l1", validate_args=False))


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = CALIBRATION_BINS) -> dict[str, list]:
    """What a reliability diagram draws: per equal-width bin of the probability, its image count,
    mean probability and fraction of positive images (None in empty bins); K classes: of the
    top-class probability and the fraction called right."""
    probs, labels = top_class(probs, labels)
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
    """Temperature scaling (Guo et al. 2017): the T for which sigmoid(logits / T) (K classes:
    softmax) has the lowest cross-entropy on these (val) labels, fitted by LBFGS on log T; kept
    within TEMPERATURE_RANGE."""
    import math

    multiclass = logits.dim() == 2
    x = logits.detach().double() if multiclass else logits.detach().double().flatten()
    y = labels.detach().long() if multiclass else labels.detach().double().flatten()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = x / log_t.exp()
        loss = F.cross_entropy(scaled, y) if multiclass else F.binary_cross_entropy_with_logits(scaled, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TEMPERATURE_RANGE
    temperature = math.exp(log_t.item())
    return min(max(temperature, low), high) if math.isfinite(temperature) else high
