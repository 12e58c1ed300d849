"""The configs: where they are, and the options checked before a command reads anything.

Every option a user can give is checked here, by the command's table below, as the first thing
the command does: a bad value is one line naming the option, the value and what is allowed,
before any data is read (not after a whole training run). The components that use an option
check it again with the same helpers (`check_choice`, `check_number`), so that they stay safe
when called from code.

Why not Hydra's structured configs with Enums: Hydra would refuse a bad value while composing,
with a several-line message and, in a multirun, by stopping the whole sweep. Here a sweep's
bad value fails that run alone (its `failed.json`), as every other run error does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xray_cls.errors import UserInputError

# The choices of the options that name a method or a part, here so that checking them imports
# nothing heavy; the modules that implement them take their names from here.
AUGMENTATIONS = ("none", "mild", "strong")  # data.aug: the presets of data/augment.py
GEOMETRIES = ("crop", "stretch")  # data.geometry: how a non-square image becomes square (data/images.py)
THRESHOLD_RULES = ("fixed", "youden", "youden_neutral", "sensitivity")  # threshold_rule (metrics.py)
CALIBRATIONS = ("none", "temperature")  # calibration (val_choices.py)
SPLITS = ("train", "val", "test")
EXPORT_FORMATS = ("onnx", "torchscript")  # export's format (export.py)
ADAPTATIONS = ("bn", "normalization")  # adapt's method and evaluate's site.adapt (site.py)
MAX_IMAGE_SIZE = 2048  # the largest side images are resized to (data.image_size, a checkpoint's preprocessing)

# conf/ sits beside the package in a source checkout and inside it in an installed wheel.
_PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = next(p for p in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf") if p.is_dir())


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


def _pos_weight(option: str, value: Any) -> Any:
    if value not in (None, "balanced"):
        check_number(option, value, 0, low_open=True, expected="null, balanced or a positive number")
    return value


DATA = [
    choice("data.aug", AUGMENTATIONS, "a known augmentation preset"),
    choice("data.geometry", GEOMETRIES),
    number("data.batch_size", 1, integer=True),
    number("data.image_size", 1, MAX_IMAGE_SIZE, integer=True, none=True),
    number("data.aspect", 0, 10, high_open=True),
    number("data.mixup", 0, 10, expected="a number in [0, 10] (0: off)"),
    number("data.val_fraction", 0, 1, low_open=True, high_open=True),
    number("data.test_fraction", 0, 1, low_open=True, high_open=True),
    number("data.min_val_images", 0, integer=True),
    number("data.num_workers", 0, integer=True),
    number("data.folds", 2, 100, integer=True, none=True, expected="null (one val split) or an integer from 2 to 100"),
    number("data.fold", 0, integer=True),
    number("data.fold_seed", integer=True),
    choice("data.uncertain", ("ignore", "zeros", "ones")),
    number("data.max_missing", 0, 1),
]
REPORTING = [
    number("bootstrap.resamples", 0, integer=True, expected="0 (no intervals) or a positive integer"),
    number("bootstrap.confidence", 0, 1, low_open=True, high_open=True),
    number("gradcam_samples", 0, integer=True),
    number("target_sensitivity", 0, 1, low_open=True),
    number("seed", integer=True),
]
OPTIONS = {
    "train": [
        *DATA,
        *REPORTING,
        choice("threshold_rule", THRESHOLD_RULES, "known"),
        choice("calibration", CALIBRATIONS, "known"),
        number("threshold", 0, 1),
        Option("loss.pos_weight", _pos_weight),
        number("loss.label_smoothing", 0, 1, high_open=True),
        number("model.dropout", 0, 1, high_open=True),
        number("model.freeze_epochs", 0, integer=True),
        number("model.backbone_lr_scale", 0, 1),
        Option("model.download", lambda option, value: check_bool(option, value)),
        choice("checkpoint.mode", ("min", "max")),
        choice("checkpoint.test", ("best", "last")),
        number("callbacks.progress_bar.refresh_seconds", 0, low_open=True, expected="a number of seconds > 0"),
        number("trainer.max_epochs", 1, integer=True),
    ],
    "evaluate": [
        *DATA,
        *REPORTING,
        choice("split", SPLITS, "a split of this data"),
        number("threshold", 0, 1, none=True),
        number("site.calibration_fraction", 0, 1, low_open=True, high_open=True, none=True),
        number("site.seed", integer=True),
        choice("site.adapt", ("none", *ADAPTATIONS)),
        choice("site.adapt_on", ("calibration", "all")),
        Option("site.recalibrate", lambda option, value: check_bool(option, value)),
    ],
    "adapt": [
        choice("method", ADAPTATIONS),
        number("batch_size", 1, integer=True),
    ],
    "recalibrate": [
        *DATA,
        number("target_sensitivity", 0, 1, low_open=True),
        number("bootstrap.resamples", 0, integer=True, expected="0 (no intervals) or a positive integer"),
        number("bootstrap.confidence", 0, 1, low_open=True, high_open=True),
    ],
    "predict": [
        number("batch_size", 1, integer=True),
        number("threshold", 0, 1, none=True),
    ],
    "export": [
        choice("format", EXPORT_FORMATS, "known"),
        number("opset", 7, 30, integer=True),
    ],
}


def check_options(cfg: DictConfig, command: str) -> None:
    """Check every option of `command` that the composed config has, in the table's order."""
    for option in OPTIONS[command]:
        value = OmegaConf.select(cfg, option.key, default=_ABSENT)  # also for a value still ??? (required)
        if value is not _ABSENT:
            option.check(option.key, value)
    if command == "train":
        from xray_cls.task import task_of_run
        from xray_cls.train import check_for_classes

        task = task_of_run(cfg.task, cfg.data)
        if not task.binary:  # a binary task's .npz may hold more labels: checked again once it is read
            check_for_classes(cfg, len(task.classes))


_ABSENT = object()


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
