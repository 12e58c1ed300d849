"""Metrics beyond torchmetrics' own: the decision threshold chosen on validation predictions, and
bootstrap confidence intervals of the test metrics."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from xray_cls.config import THRESHOLD_RULES

NEUTRAL_THRESHOLD = 0.5  # where the (weighted) loss is indifferent between the classes


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Calibrated probabilities of logits: of the positive class, (N,), for two classes' one logit;
    of each class, (N, K), for K >= 3 classes' logits."""
    scaled = logits / temperature
    return torch.sigmoid(scaled) if scaled.dim() == 1 else torch.softmax(scaled, dim=1)


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


def per_class_scores(matrix: list[list[int]], probs: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each class's precision, recall, specificity and F1 (from the K x K matrix, rows true) and
    one-vs-rest AUROC (None for a class the images lack), with its support: its test images."""
    from torchmetrics.functional.classification import multiclass_auroc

    counts = torch.tensor(matrix, dtype=torch.float64)
    tp = counts.diag()
    support, called, total = counts.sum(1), counts.sum(0), counts.sum()
    auroc = multiclass_auroc(probs.float(), labels, len(names), average=None, validate_args=False).tolist()
    scores = {}
    for k, name in enumerate(names):
        precision = tp[k] / called[k] if called[k] else 0.0
        recall = tp[k] / support[k] if support[k] else 0.0
        negatives = total - support[k]
        specificity = (negatives - (called[k] - tp[k])) / negatives if negatives else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[name] = {"precision": float(precision), "recall": float(recall), "specificity": float(specificity),
                        "f1": float(f1), "auroc": auroc[k] if support[k] and negatives else None, "support": int(support[k])}
    return scores


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
