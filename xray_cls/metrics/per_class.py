"""Each class's precision, recall, specificity, F1 and one-vs-rest AUROC, for three or more classes."""

from __future__ import annotations

from typing import Any

import torch


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
