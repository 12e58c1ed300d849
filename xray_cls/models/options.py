"""The networks' options that are checked before a run builds one (model.*), declared without importing torch."""

from __future__ import annotations

from xray_cls.core.options import Option, check_bool, number

MODEL = [
    number("model.dropout", 0, 1, high_open=True),
    number("model.freeze_epochs", 0, integer=True),
    number("model.backbone_lr_scale", 0, 1),
    Option("model.download", lambda option, value: check_bool(option, value)),
]
