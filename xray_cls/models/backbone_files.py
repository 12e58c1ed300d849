"""Backbone files: a network's weights without its output layer, with where they came from.

`python -m xray_cls.pretrain` writes one (backbone.pth); `model.weights=<file>` starts a new run's
network from it, for the network and image size it was pretrained as, and refuses it in one line
for any other. A file from outside is read like a checkpoint: its zip's checksums verified, as
tensors and plain values only, its network named exactly and built on the meta device before
anything is allocated, its weights finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from xray_cls.core.errors import UserInputError

FORMAT = "xray_cls.backbone/1"
EXPECTED = "a backbone.pth written by python -m xray_cls.pretrain, or a state dict of this network"


@dataclass(frozen=True)
class BackboneFile:
    path: Path
    network: dict[str, Any]  # the network config it was pretrained as
    image_size: int
    in_channels: int
    mean: float  # the pixel statistics of the pretraining's images, by which its networks normalize
    std: float
    provenance: dict[str, Any]
    state: dict[str, Tensor]


def backbone_record(network: dict[str, Any], preprocessing: dict[str, Any], provenance: dict[str, Any],
                    state: dict[str, Tensor]) -> dict[str, Any]:
    """What backbone.pth holds (written with core.checkpoint_files.write_checkpoint)."""
    kept = {k: preprocessing[k] for k in ("image_size", "in_channels", "mean", "std", "geometry")}
    return {"format": FORMAT, "network": {k: v for k, v in network.items() if k != "num_classes"}, "preprocessing": kept,
            "provenance": provenance, "state_dict": state}


def read_backbone_file(path: Path, option: str) -> BackboneFile | None:
    """The backbone file at `path`; None when it is a plain state dict (a torchvision or timm file),
    which the caller reads as such; one UserInputError when it is neither, or not to be trusted."""
    from xray_cls.models.untrusted_files import check_state_dict, load_plain, network_problem, pixels_problem

    record = load_plain(path, option, EXPECTED)
    if not isinstance(record, dict) or "format" not in record:
        return None
    where = f"{option}={path}"
    if record["format"] != FORMAT or not all(isinstance(record.get(k), dict) for k in ("network", "preprocessing", "provenance")):
        raise UserInputError(f"{where} is not a backbone file of this xray_cls (format {str(record['format'])[:40]!r}); expected {EXPECTED}")
    network, prep = record["network"], record["preprocessing"]
    problem = network_problem(network) or pixels_problem(prep) or provenance_problem(record["provenance"])
    if problem:
        raise UserInputError(f"{where} is not a backbone file that can be trusted: {problem}; expected {EXPECTED}")
    state = record.get("state_dict")
    if not isinstance(state, dict):
        raise UserInputError(f"{where} holds no state_dict; expected {EXPECTED}")
    arguments = {**network, "in_channels": prep["in_channels"], "image_size": prep["image_size"]}
    check_state_dict(arguments, state, where, prefix="", backbone=True)
    return BackboneFile(Path(path), network, prep["image_size"], prep["in_channels"], float(prep["mean"]), float(prep["std"]),
                        record["provenance"], state)


def provenance_problem(provenance: dict[str, Any], depth: int = 0) -> str | None:
    """Provenance is read for the log and metrics.json only: plain values, a few levels deep."""
    for key, value in provenance.items():
        if isinstance(value, dict) and depth < 3:
            problem = provenance_problem(value, depth + 1)
        elif isinstance(value, list) and len(value) <= 10_000:
            problem = None if all(type(v) in (bool, int, float, str, type(None)) for v in value) else f"provenance.{key} holds objects"
        else:
            problem = None if type(value) in (bool, int, float, str, type(None)) else f"provenance.{key} is a {type(value).__name__}"
        if problem or not isinstance(key, str):
            return problem or "provenance has a key that is not a string"
    return None


def with_defaults(network: dict[str, Any]) -> dict[str, Any]:
    """A network config with the arguments it leaves out at their defaults (lists for tuples), so
    that two configs of the same network compare equal; without num_classes (the output layer's)."""
    import inspect

    from xray_cls.models.networks import NETWORKS, canonical_config

    network = canonical_config(network)
    builder = NETWORKS.get(network.get("_target_"))
    defaults = {name: p.default for name, p in inspect.signature(builder).parameters.items()
                if p.default is not inspect.Parameter.empty} if builder else {}
    full = {**defaults, **network}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in full.items() if k not in ("num_classes", "in_channels", "image_size")}


def backbone_shapes(net_cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The backbone tensors' shapes of the network `net_cfg` builds, on the meta device (no memory)."""
    import torch

    from xray_cls.models.features import output_keys
    from xray_cls.models.networks import build_network

    with torch.device("meta"):
        net = build_network(net_cfg)
    left_out = set(output_keys(net))
    return {k: tuple(v.shape) for k, v in net.state_dict().items() if k not in left_out}


def check_fits(file: BackboneFile, net_cfg: dict[str, Any], image_size: int, in_channels: int, option: str) -> None:
    """The run's network must hold exactly the backbone's tensors, and its images be those it was
    pretrained on (size, channels): else one line saying what differs."""
    from xray_cls.models.untrusted_files import network_name

    held = {k: tuple(v.shape) for k, v in file.state.items()}
    fits = backbone_shapes({**net_cfg, "in_channels": in_channels, "image_size": image_size}) == held
    if fits and file.image_size == image_size and file.in_channels == in_channels:
        return
    pretrained, wanted = with_defaults(file.network), with_defaults(net_cfg)
    keys = ["_target_"] if pretrained.get("_target_") != wanted.get("_target_") else sorted(pretrained.keys() | wanted.keys())
    differ = [f"model.{k}={pretrained.get(k)!r} there, {wanted.get(k)!r} here" for k in keys if pretrained.get(k) != wanted.get(k)]
    if file.image_size != image_size:
        differ.append(f"data.image_size={file.image_size} there, {image_size} here")
    if file.in_channels != in_channels:
        differ.append(f"{file.in_channels} input channel(s) there, {in_channels} here")
    raise UserInputError(
        f"{option}: {file.path} was pretrained for {network_name(file.network)} at {file.image_size} px, not for this "
        f"run's {network_name(net_cfg)} at {image_size} px ({'; '.join(differ) or 'its tensors differ'}); expected the model "
        "and data.image_size it was pretrained with, or pretrain again for this one"
    )


def load_backbone(net: nn.Module, file: BackboneFile) -> None:
    """The backbone's tensors into `net`: every one but the output layer's, which stays new."""
    from xray_cls.models.backbones import load_matching
    from xray_cls.models.features import output_keys

    load_matching(net, file.state, output_keys(net), f"model.weights={file.path}")
