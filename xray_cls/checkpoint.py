"""Reading a run's checkpoint safely and rebuilding the trained classifier from it.

A checkpoint is loaded with `weights_only=True`: tensors and plain containers only, never
arbitrary pickled code. Nothing in it is instantiated: its network must be one of
`xray_cls.networks.NETWORKS`, named exactly, with arguments that are plain numbers, strings,
booleans, None or lists of those, and it is built by calling that class (`build_network`), never
through Hydra's recursive instantiate. The optimizer and scheduler configs it holds are never
read: evaluation does not need them, and a resumed run builds its own from its config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from xray_cls.errors import UserInputError
from xray_cls.files import atomic_write

if TYPE_CHECKING:
    from xray_cls.classifier import XrayClassifier

EXPECTED = "a .ckpt file written by an xray_cls run (outputs/<run>/checkpoints/best.ckpt or last.ckpt)"


def read_checkpoint(path: str | Path, option: str = "ckpt") -> dict[str, Any]:
    """The checkpoint at `path` as a dict, or one UserInputError naming `option`, the path and what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserInputError(f"{option}={path} {what}; expected {EXPECTED}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise UserInputError(f"{option}={path} cannot be read (permission denied)") from None
    except Exception as err:  # truncated zip, foreign pickle, refused global, ...: all mean "not ours"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(
            f"{option}={path} is not a readable checkpoint ({reason[:200]}); expected {EXPECTED}"
        ) from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if "state_dict" not in checkpoint or not isinstance(hparams, dict) or not isinstance(hparams.get("net"), dict):
        raise UserInputError(f"{option}={path} is a PyTorch file but not an xray_cls checkpoint; expected {EXPECTED}")
    if not isinstance(hparams.get("preprocessing"), dict):
        raise UserInputError(
            f"{option}={path} was written by an older xray_cls without its preprocessing; retrain it to use it here"
        )
    problem = untrusted_part(hparams)
    if problem:
        raise UserInputError(f"{option}={path} is not an xray_cls checkpoint that can be trusted: {problem}; expected {EXPECTED}")
    return checkpoint


def untrusted_part(hparams: dict[str, Any]) -> str | None:
    """What, in the hyper-parameters a checkpoint rebuilds its model from, is more than the exact
    name of one of our networks and plain values; None when nothing is."""
    from xray_cls.networks import NETWORKS

    net = dict(hparams["net"])
    target = net.pop("_target_", None)
    if target not in NETWORKS:
        return f"net._target_={str(target)[:100]!r} is not one of {', '.join(NETWORKS)}"
    for key, value in net.items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            return f"net has the key {str(key)[:100]!r}, which is not a network argument"
        if not _is_plain(value, lists=True):
            return f"net.{key} is {_kind(value)}, not a number, string, boolean, None or a list of those"
    if type(hparams.get("threshold", 0.5)) not in (int, float):
        return f"threshold is {_kind(hparams['threshold'])}, not a number"
    temperature = hparams.get("temperature", 1.0)
    if type(temperature) not in (int, float) or not 0 < temperature < float("inf"):
        return f"temperature is {_kind(temperature) if type(temperature) not in (int, float) else temperature}, not a positive number"
    if type(hparams.get("pos_weight")) not in (int, float, type(None)):
        return f"pos_weight is {_kind(hparams['pos_weight'])}, not a number or None"
    for group in ("preprocessing", "threshold_rule"):
        for key, value in (hparams.get(group) or {}).items():
            if not _is_plain(value, lists=True):
                return f"{group}.{key} is {_kind(value)}, not a number, string or a list of those"
    return None


PLAIN_TYPES = (bool, int, float, str, type(None))


def _is_plain(value: Any, lists: bool = False) -> bool:
    """A plain number, string, boolean or None (subclasses excluded); with `lists`, also a list of those."""
    if lists and type(value) in (list, tuple):
        return all(type(item) in PLAIN_TYPES for item in value)
    return type(value) in PLAIN_TYPES


def _kind(value: Any) -> str:
    if type(value) in (list, tuple):
        return f"a list holding {_kind(next(item for item in value if type(item) not in PLAIN_TYPES))}"
    if isinstance(value, dict) and "_target_" in value:
        return f"a config to instantiate ({str(value['_target_'])[:100]})"
    return f"a {type(value).__name__}"


def load_classifier(path: str | Path, option: str = "ckpt") -> XrayClassifier:
    """The trained classifier of a checkpoint, in eval mode, with its preprocessing, threshold and temperature."""
    from xray_cls.classifier import XrayClassifier

    checkpoint = read_checkpoint(path, option)
    hparams = checkpoint["hyper_parameters"]
    trusted = ("net", "threshold", "pos_weight", "preprocessing", "threshold_rule", "temperature")  # never optimizer or scheduler
    try:
        module = XrayClassifier(**{key: hparams[key] for key in trusted if key in hparams})
        module.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0]
        raise UserInputError(f"{option}={path} does not match the network it names ({reason[:200]})") from None
    return module.eval()


def network_name(net_cfg: Any) -> str:
    """CNN for {"_target_": "xray_cls.networks.CNN", ...}, a dict or a DictConfig."""
    return str(net_cfg.get("_target_", "?")).rsplit(".", 1)[-1]


def record_val_choices(path: Path, checkpoint: dict[str, Any], threshold: dict[str, Any], temperature: float) -> None:
    """Store what the run chose on val in its checkpoint (`checkpoint`, as read from `path`): the
    threshold and the temperature, so that `predict` and `evaluate` use them.

    Written to a temporary name and renamed: the checkpoint is never left half-written.
    """
    checkpoint["hyper_parameters"]["threshold"] = threshold["threshold"]
    checkpoint["hyper_parameters"]["threshold_rule"] = threshold
    checkpoint["hyper_parameters"]["temperature"] = float(temperature)
    with atomic_write(path) as tmp:
        torch.save(checkpoint, tmp)
