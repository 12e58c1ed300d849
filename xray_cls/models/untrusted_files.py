"""What every file from outside must pass before a network is built from it: its zip's checksums,
a load that never runs code, a network named exactly with plain arguments, pixel statistics in
bounds, and tensors of exactly the shapes that network has, checked on the meta device first.
Run checkpoints (`checkpoints`), pretraining checkpoints and backbone files (`backbone_files`)
are each read through these."""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from xray_cls.core.errors import UserInputError

PLAIN_TYPES = (bool, int, float, str, type(None))
MAX_LIST_ARGUMENT = 64  # layers or stages a network argument lists; the study's have 1 to 4


def load_plain(path: str | Path, option: str, expected: str) -> Any:
    """The PyTorch file at `path`, its zip checked against its CRC-32s and read as tensors and plain
    containers only (never code), or one UserInputError naming `option`, the path and `expected`."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserInputError(f"{option}={path} {what}; expected {expected}")
    damaged = damaged_entry(path)
    if damaged:
        raise UserInputError(f"{option}={path} is damaged: {damaged}; expected {expected}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise UserInputError(f"{option}={path} cannot be read (permission denied)") from None
    except pickle.UnpicklingError as err:  # weights_only refused an object: the file tried to be more than data
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise UserInputError(
            f"{option}={path} is not a plain checkpoint: it holds Python objects{what} that could run code when loaded, "
            f"so it will not be loaded; expected {expected}"
        ) from None
    except Exception as err:  # truncated zip, foreign file, ...: all mean "not ours"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(
            f"{option}={path} is not a readable checkpoint ({reason[:200]}); expected {expected}"
        ) from None
    return checkpoint


def damaged_entry(path: Path) -> str | None:
    """What of a checkpoint's zip does not match its own CRC-32 checksums, or None. torch's reader
    never checks them: a flipped byte in a tensor would load as another weight, or NaN."""
    try:
        if not zipfile.is_zipfile(path):
            return None  # torch's legacy format, or not a checkpoint at all: torch.load says which
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except PermissionError:
        return None  # said by torch.load, as for any file
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as err:
        return f"its zip cannot be read ({' '.join(str(err).split())[:150] or type(err).__name__})"
    return f"{bad[:100]} does not match its checksum" if bad else None


def network_problem(net: dict[str, Any]) -> str | None:
    """What, in a network config read from a file, is more than the exact name of one of our
    networks and plain arguments; None when nothing is."""
    from xray_cls.models.networks import NETWORKS, canonical_target

    net = dict(net)
    target = net.pop("_target_", None)
    if canonical_target(target) not in NETWORKS:
        return f"net._target_={str(target)[:100]!r} is not one of {', '.join(NETWORKS)}"
    for key, value in net.items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            return f"net has the key {str(key)[:100]!r}, which is not a network argument"
        if not is_plain(value, lists=True):
            return f"net.{key} is {kind_of(value)}, not a number, string, boolean, None or a list of those"
        if type(value) in (list, tuple) and len(value) > MAX_LIST_ARGUMENT:
            return f"net.{key} has {len(value):,} items; a network argument holds at most {MAX_LIST_ARGUMENT}"
    return None


def pixels_problem(prep: dict[str, Any]) -> str | None:
    """What in the image size, channels, pixel statistics and geometry of a file's preprocessing is out of bounds."""
    from xray_cls.data.options import GEOMETRIES, MAX_IMAGE_SIZE

    def number(key: str) -> Any:
        value = prep.get(key)
        return value if type(value) in (int, float) and math.isfinite(value) else None

    if type(prep.get("image_size")) is not int or not 1 <= prep["image_size"] <= MAX_IMAGE_SIZE:
        return f"preprocessing.image_size={str(prep.get('image_size'))[:50]} is not an integer from 1 to {MAX_IMAGE_SIZE}"
    if type(prep.get("in_channels")) is not int or not 1 <= prep["in_channels"] <= 4:
        return f"preprocessing.in_channels={str(prep.get('in_channels'))[:50]} is not an integer from 1 to 4"
    if number("mean") is None:
        return f"preprocessing.mean={str(prep.get('mean'))[:50]} is not a finite number"
    if number("std") is None or prep["std"] <= 0:
        return f"preprocessing.std={str(prep.get('std'))[:50]} is not a positive number"
    if "geometry" in prep and prep["geometry"] not in GEOMETRIES:
        return f"preprocessing.geometry={str(prep['geometry'])[:50]!r} is not one of {', '.join(GEOMETRIES)}"
    return None


def check_state_dict(net_cfg: dict[str, Any], state_dict: Any, source: str, prefix: str = "net.", backbone: bool = False) -> None:
    """The network `net_cfg` names, built on PyTorch's meta device (shapes, no memory), must have
    exactly the tensors of `state_dict` (under `prefix`; with `backbone`, all but its output
    layer's): so that arguments that would build a network far larger than the file
    (hidden=[1000000]) are refused before anything is allocated."""
    from xray_cls.models.features import output_keys
    from xray_cls.models.networks import build_network

    try:
        with torch.device("meta"):
            net = build_network(net_cfg)
            left_out = set(output_keys(net)) if backbone else set()
            expected = {f"{prefix}{k}": tuple(v.shape) for k, v in net.state_dict().items() if k not in left_out}
    except Exception as err:  # noqa: BLE001  any argument may be hostile: a failure of any kind is "not buildable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(f"{source} names a network that cannot be built ({reason[:200]})") from None
    held = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(k, str) and k.startswith(prefix) and isinstance(v, torch.Tensor)}
    differ = sorted(k for k in expected.keys() | held.keys() if expected.get(k) != held.get(k))
    if differ:
        key = differ[0]
        raise UserInputError(
            f"{source} does not match the network it names ({len(differ)} tensor(s) differ; {key}: the arguments build "
            f"{list(expected[key]) if key in expected else 'nothing'}, the file holds {list(held[key]) if key in held else 'nothing'})"
        )
    broken = next((k for k, v in state_dict.items() if k in held and v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken:
        raise UserInputError(f"{source} holds weights that are not finite numbers (NaN or infinity in {broken}): a diverged run, "
                             "or a damaged file; expected a checkpoint of a run that trained")


def is_plain(value: Any, lists: bool = False) -> bool:
    """A plain number, string, boolean or None (subclasses excluded); with `lists`, also a list of those."""
    if lists and type(value) in (list, tuple):
        return all(type(item) in PLAIN_TYPES for item in value)
    return type(value) in PLAIN_TYPES


def kind_of(value: Any) -> str:
    if type(value) in (list, tuple):
        return f"a list holding {kind_of(next(item for item in value if type(item) not in PLAIN_TYPES))}"
    if isinstance(value, dict) and "_target_" in value:
        return f"a config to instantiate ({str(value['_target_'])[:100]})"
    return f"a {type(value).__name__}"


def network_name(net_cfg: Any) -> str:
    """CNN for {"_target_": "xray_cls.models.networks.CNN", ...}, a dict or a DictConfig."""
    return str(net_cfg.get("_target_", "?")).rsplit(".", 1)[-1]
