"""Options: how a value a user gives is checked, and the check of a command's options.

Every option is declared, with its check, by the layer that owns it (`data/options.py`,
`metrics/options.py`, `models/options.py`, `training/options.py`, `evaluation/options.py`); each
command gathers the lists it takes and checks them with `check_options` as the first thing it does:
a bad value is one line naming the option, the value and what is allowed, before any data is read
(not after a whole training run). The components that use an option check it again with the same
helpers (`check_choice`, `check_number`), so that they stay safe when called from code. The
`options.py` modules import nothing heavy: checking costs no torch import.

Why not Hydra's structured configs with Enums: Hydra would refuse a bad value while composing,
with a several-line message and, in a multirun, by stopping the whole sweep. Here a sweep's
bad value fails that run alone (its `failed.json`), as every other run error does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xray_cls.core.errors import UserInputError


def is_number(value: Any, kind: type | tuple[type, ...] = (int, float)) -> bool:
    """Whether a config value is a number (of `kind`). YAML's true and false are not, although
    Python counts bool as an int."""
    return isinstance(value, kind) and not isinstance(value, bool)


def check_choice(option: str, value: Any, choices: Iterable[str], verb: str = "valid") -> str:
    """`value` when it is one of `choices`; else `<option>=<value> is not <verb>; expected one of ...`."""
    choices = list(choices)
    if value not in choices:
        raise UserInputError(f"{option}={value!r} is not {verb}; expected one of {', '.join(choices)}")
    return value


def check_bool(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserInputError(f"{option}={value!r} is not valid; expected true or false")
    return value


def check_number(
    option: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
    low_open: bool = False,
    high_open: bool = False,
    none: bool = False,
    expected: str | None = None,
) -> Any:
    """`value` when it is a number (an integer if `integer`) within the bounds (open or closed
    at each end; None allowed with `none`); else one line naming the option and the bounds."""
    if value is None and none:
        return None
    ok = is_number(value, int if integer else (int, float)) and value == value  # not NaN
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise UserInputError(
            f"{option}={value!r} is not valid; expected {expected or describe(low, high, integer, low_open, high_open)}"
        )
    return value


def describe(low: float | None, high: float | None, integer: bool, low_open: bool, high_open: bool) -> str:
    """The allowed range in words: "a positive integer (at most 2048)", "a number in [0, 1)"."""
    if integer and low in (0, 1) and not low_open:
        words = "a positive integer" if low == 1 else "0 or a positive integer"
        return words + (f" (at most {high})" if high is not None else "")
    if high is None:
        return f"a number {'>' if low_open else '>='} {low}"
    return f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


@dataclass(frozen=True)
class Option:
    """An option of a command's config, by its dotted key, and how it is checked; an option the
    composed config does not have (a data config without it) is not checked."""

    key: str
    check: Callable[[str, Any], Any]


def choice(key: str, choices: Iterable[str], verb: str = "valid") -> Option:
    return Option(key, lambda option, value: check_choice(option, value, choices, verb))


def number(key: str, *bounds: float | None, **options: Any) -> Option:
    return Option(key, lambda option, value: check_number(option, value, *bounds, **options))


def check_options(cfg: DictConfig, options: Iterable[Option]) -> None:
    """Check every one of `options` that the composed config has, in their order."""
    for option in options:
        value = OmegaConf.select(cfg, option.key, default=_ABSENT)  # also for a value still ??? (required)
        if value is not _ABSENT:
            option.check(option.key, value)


_ABSENT = object()
