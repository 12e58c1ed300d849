"""The options of a pretraining (pretrain.*, views.*, ssl.*), declared without importing torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xray_cls.core.errors import UserInputError
from xray_cls.core.options import Option, check_bool, number


def _sources(option: str, value: Any) -> Any:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise UserInputError(f"{option}={value!r} is not valid; expected a list of folders and .npz files, e.g. [/path/to/images]")
    return value


def _sigma(option: str, value: Any) -> Any:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value) \
            or not 0 < value[0] <= value[1]:
        raise UserInputError(f"{option}={value!r} is not valid; expected [low, high] with 0 < low <= high (pixels at 224 px)")
    return value


PRETRAIN = [
    Option("pretrain.data", check_bool),
    Option("pretrain.sources", _sources),
    Option("pretrain.include_test", check_bool),
    number("pretrain.batch_size", 2, integer=True, expected="an integer >= 2 (views are compared within a batch)"),
    number("pretrain.knn_k", 0, integer=True),
    number("pretrain.knn_temperature", 0, low_open=True),
    number("views.min_scale", 0, 1, low_open=True),
    number("views.rotation", 0, 180),
    *(number(f"views.{key}", 0, 1) for key in ("rotation_prob", "jitter_prob", "blur_prob", "hflip_prob")),
    *(number(f"views.{key}", 0, 1) for key in ("brightness", "contrast")),
    Option("views.blur_sigma", _sigma),
    number("ssl.temperature", 0, low_open=True),
    number("ssl.momentum", 0, 1),
    *(number(f"ssl.{key}", 1, integer=True) for key in ("hidden_dim", "projection_dim")),
]
