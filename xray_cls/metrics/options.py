"""The options of the scores and the choices made on val (threshold_rule, calibration, bootstrap.*),
and the names they choose among, declared without importing torch."""

from __future__ import annotations

from xray_cls.core.options import choice, number

THRESHOLD_RULES = ("fixed", "youden", "youden_neutral", "sensitivity")  # threshold_rule (thresholds.py)
CALIBRATIONS = ("none", "temperature")  # calibration (val_choices.py)

# What every command that scores a model takes: bootstrap intervals, the sensitivity rule's target.
SCORING = [
    number("bootstrap.resamples", 0, integer=True, expected="0 (no intervals) or a positive integer"),
    number("bootstrap.confidence", 0, 1, low_open=True, high_open=True),
    number("target_sensitivity", 0, 1, low_open=True),
]
# The choices a run makes on val after fitting.
CHOICES = [
    choice("threshold_rule", THRESHOLD_RULES, "known"),
    choice("calibration", CALIBRATIONS, "known"),
    number("threshold", 0, 1),
]
