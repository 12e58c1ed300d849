"""The options of fitting a run (loss.*, checkpoint.*, the trainer's and callbacks' own), declared
without importing torch."""

from __future__ import annotations

from typing import Any

from xray_cls.core.options import Option, check_number, choice, number


def _pos_weight(option: str, value: Any) -> Any:
    if value not in (None, "balanced"):
        check_number(option, value, 0, low_open=True, expected="null, balanced or a positive number")
    return value


TRAINING = [
    Option("loss.pos_weight", _pos_weight),
    number("loss.label_smoothing", 0, 1, high_open=True),
    choice("checkpoint.mode", ("min", "max")),
    choice("checkpoint.test", ("best", "last")),
    number("callbacks.progress_bar.refresh_seconds", 0, low_open=True, expected="a number of seconds > 0"),
    number("trainer.max_epochs", 1, integer=True),
]
