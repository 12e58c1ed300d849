"""Reading a run's checkpoint safely and rebuilding the trained classifier from it.

A checkpoint is loaded with `weights_only=True`: tensors and plain containers only, never
arbitrary pickled code. The network it names is built only if it is one of `xray_cls.networks`,
so a foreign `_target_` cannot make the loader run anything else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from xray_cls.errors import UserInputError

if TYPE_CHECKING:
    from xray_cls.classifier import XrayClassifier

NETWORKS_MODULE = "xray_cls.networks."
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
    net = hparams.get("net") if isinstance(hparams, dict) else None
    target = net.get("_target_", "") if isinstance(net, dict) else ""
    if "state_dict" not in checkpoint or not isinstance(target, str) or not target.startswith(NETWORKS_MODULE):
        raise UserInputError(f"{option}={path} is a PyTorch file but not an xray_cls checkpoint; expected {EXPECTED}")
    if not isinstance(hparams.get("preprocessing"), dict):
        raise UserInputError(
            f"{option}={path} was written by an older xray_cls without its preprocessing; retrain it to use it here"
        )
    return checkpoint


def load_classifier(path: str | Path, option: str = "ckpt") -> XrayClassifier:
    """The trained classifier of a checkpoint, in eval mode, with its preprocessing and threshold."""
    from xray_cls.classifier import XrayClassifier

    checkpoint = read_checkpoint(path, option)
    try:
        module = XrayClassifier(**checkpoint["hyper_parameters"])
        module.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0]
        raise UserInputError(f"{option}={path} does not match the network it names ({reason[:200]})") from None
    return module.eval()


def network_name(net_cfg: Any) -> str:
    """CNN for {"_target_": "xray_cls.networks.CNN", ...}, a dict or a DictConfig."""
    return str(net_cfg.get("_target_", "?")).rsplit(".", 1)[-1]


def record_threshold(path: Path, checkpoint: dict[str, Any], threshold: dict[str, Any]) -> None:
    """Store the run's chosen threshold in its checkpoint (`checkpoint`, as read from `path`), so
    that `predict` and `evaluate` use it.

    Written to a temporary name and renamed: the checkpoint is never left half-written.
    """
    checkpoint["hyper_parameters"]["threshold"] = threshold["threshold"]
    checkpoint["hyper_parameters"]["threshold_rule"] = threshold
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
