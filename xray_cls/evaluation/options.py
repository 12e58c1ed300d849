"""The options of evaluating a trained model (split, site.*, the adaptation methods), declared
without importing torch."""

from __future__ import annotations

from xray_cls.core.options import Option, check_bool, choice, number
from xray_cls.data.options import SPLITS

ADAPTATIONS = ("bn", "normalization")  # adapt's method and evaluate's site.adapt (site.py)

EVALUATION = [
    choice("split", SPLITS, "a split of this data"),
    number("threshold", 0, 1, none=True),
]
SITE = [
    number("site.calibration_fraction", 0, 1, low_open=True, high_open=True, none=True),
    number("site.seed", integer=True),
    choice("site.adapt", ("none", *ADAPTATIONS)),
    choice("site.adapt_on", ("all", "calibration")),
    Option("site.recalibrate", lambda option, value: check_bool(option, value)),
    Option("site.choose", lambda option, value: check_bool(option, value)),
]
