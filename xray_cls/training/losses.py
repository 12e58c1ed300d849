"""The loss of a run: class weights (`loss.pos_weight` for two classes, `loss.class_weight` for more),
label smoothing, and the options that apply to two classes only or to three or more only."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, ListConfig

from xray_cls.core.errors import UserInputError
from xray_cls.core.options import check_number, is_number

log = logging.getLogger(__name__)


def positive_class_weight(setting: float | str | None, class_counts: list[int]) -> float | None:
    """loss.pos_weight: null (no weighting), a number, or `balanced` (NORMAL / PNEUMONIA counts of train)."""
    if setting is None:
        return None
    if setting == "balanced":
        negatives, positives = class_counts
        return negatives / positives
    return float(check_number("loss.pos_weight", setting, 0, low_open=True, expected="null, balanced or a positive number"))


def check_for_classes(cfg: DictConfig, num_classes: int) -> None:
    """The options that apply to two classes only, or to three or more only, each refused in one
    line where they do not, before anything is trained."""
    from xray_cls.metrics.val_choices import check_rule_applies

    check_rule_applies(cfg.threshold_rule, num_classes)
    class_weight = cfg.loss.get("class_weight")
    if num_classes == 2 and class_weight is not None:
        raise UserInputError(f"loss.class_weight={class_weight} weighs three or more classes; this task has two: "
                             "expected loss.pos_weight (null, balanced or a number) and loss.class_weight=null")
    if num_classes > 2 and cfg.loss.pos_weight is not None:
        raise UserInputError(f"loss.pos_weight={cfg.loss.pos_weight} weighs the positive class of two; this task has "
                             f"{num_classes} classes: expected loss.class_weight (null, balanced or a list of {num_classes} numbers) "
                             "and loss.pos_weight=null")
    if num_classes > 2 and class_weight is not None and class_weight != "balanced":
        class_weights(class_weight, [1] * num_classes)


def class_weights(setting: Any, class_counts: list[int]) -> list[float] | None:
    """loss.class_weight for K >= 3 classes: null (none), `balanced` (n / (K * count) of train, so
    that every class weighs as much in the loss) or a list of K positive numbers, in label order."""
    k = len(class_counts)
    if setting is None:
        return None
    if setting == "balanced":
        total = sum(class_counts)
        if min(class_counts) == 0:
            raise UserInputError(f"loss.class_weight=balanced: the train split has no image of class {class_counts.index(0)}")
        return [total / (k * n) for n in class_counts]
    values = list(setting) if isinstance(setting, (list, tuple, ListConfig)) else None
    if values is None or len(values) != k or not all(is_number(v) and v > 0 for v in values):
        raise UserInputError(f"loss.class_weight={setting} is not valid; expected null, balanced or a list of {k} positive numbers")
    return [float(v) for v in values]


def label_smoothing(setting: float) -> float:
    """loss.label_smoothing: a number in [0, 1) (0: hard 0/1 targets)."""
    return float(check_number("loss.label_smoothing", setting, 0, 1, high_open=True))
