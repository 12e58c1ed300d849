"""Reading a run's checkpoint safely and rebuilding the trained classifier from it (writing one
durably: `core.checkpoint_files`).

A checkpoint is loaded with `weights_only=True`: tensors and plain containers only, never
arbitrary pickled code. Nothing in it is instantiated: its network must be one of
`xray_cls.models.networks.NETWORKS`, named exactly, with arguments that are plain numbers, strings,
booleans, None or lists of those, and it is built by calling that class (`build_network`), never
through Hydra's recursive instantiate. The optimizer and scheduler configs it holds are never
read: evaluation does not need them, and a resumed run builds its own from its config. The zip's
CRC-32s are verified first (torch's reader never checks them) and weights must be finite.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from xray_cls.core.errors import UserInputError

if TYPE_CHECKING:
    from xray_cls.models.classifier import XrayClassifier


EXPECTED = "a .ckpt file written by an xray_cls run (outputs/<run>/checkpoints/best.ckpt or last.ckpt)"


def read_checkpoint(path: str | Path, option: str = "ckpt") -> dict[str, Any]:
    """The checkpoint at `path` as a dict, or one UserInputError naming `option`, the path and what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserInputError(f"{option}={path} {what}; expected {EXPECTED}")
    damaged = damaged_entry(path)
    if damaged:
        raise UserInputError(f"{option}={path} is damaged: {damaged}; expected {EXPECTED}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise UserInputError(f"{option}={path} cannot be read (permission denied)") from None
    except pickle.UnpicklingError as err:  # weights_only refused an object: the file tried to be more than data
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise UserInputError(
            f"{option}={path} is not a plain checkpoint: it holds Python objects{what} that could run code when loaded, "
            f"so it will not be loaded; expected {EXPECTED}"
        ) from None
    except Exception as err:  # truncated zip, foreign file, ...: all mean "not ours"
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


def untrusted_part(hparams: dict[str, Any]) -> str | None:
    """What, in the hyper-parameters a checkpoint rebuilds its model from, is more than the exact
    name of one of our networks and plain values; None when nothing is."""
    from xray_cls.models.networks import NETWORKS, canonical_target

    net = dict(hparams["net"])
    target = net.pop("_target_", None)
    if canonical_target(target) not in NETWORKS:
        return f"net._target_={str(target)[:100]!r} is not one of {', '.join(NETWORKS)}"
    for key, value in net.items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            return f"net has the key {str(key)[:100]!r}, which is not a network argument"
        if not _is_plain(value, lists=True):
            return f"net.{key} is {_kind(value)}, not a number, string, boolean, None or a list of those"
        if type(value) in (list, tuple) and len(value) > MAX_LIST_ARGUMENT:
            return f"net.{key} has {len(value):,} items; a network argument holds at most {MAX_LIST_ARGUMENT}"
    threshold = hparams.get("threshold", 0.5)
    if type(threshold) not in (int, float) or not 0 <= threshold <= 1:
        return f"threshold is {_kind(threshold) if type(threshold) not in (int, float) else threshold}, not a number in [0, 1]"
    temperature = hparams.get("temperature", 1.0)
    if type(temperature) not in (int, float) or not 0 < temperature < float("inf"):
        return f"temperature is {_kind(temperature) if type(temperature) not in (int, float) else temperature}, not a positive number"
    if type(hparams.get("pos_weight")) not in (int, float, type(None)):
        return f"pos_weight is {_kind(hparams['pos_weight'])}, not a number or None"
    from xray_cls.core.task import MAX_CLASSES

    classes = net.get("num_classes", 2)
    if type(classes) is not int or not 2 <= classes <= MAX_CLASSES:
        return f"net.num_classes={str(classes)[:20]} is not an integer from 2 to {MAX_CLASSES}"
    for group in ("preprocessing", "threshold_rule"):
        for key, value in (hparams.get(group) or {}).items():
            if not _is_plain(value, lists=True) and (group, key) != ("preprocessing", "task"):  # the task: task_problem
                return f"{group}.{key} is {_kind(value)}, not a number, string or a list of those"
    from xray_cls.metrics.options import CALIBRATIONS

    if hparams.get("calibration", "none") not in CALIBRATIONS:
        return f"calibration is {str(hparams['calibration'])[:50]!r}, not one of {', '.join(CALIBRATIONS)}"
    return preprocessing_problem(hparams.get("preprocessing") or {}) or classes_problem(hparams, classes)


def classes_problem(hparams: dict[str, Any], classes: int) -> str | None:
    """A network's output width and its class weights must fit the class names it is read by."""
    names = hparams["preprocessing"]["class_names"]
    if classes != len(names):
        return f"net.num_classes={classes} does not match the {len(names)} class_names of its preprocessing"
    weight = hparams.get("class_weight")
    if weight is not None and (type(weight) is not list or len(weight) != classes or not all(type(w) in (int, float) for w in weight)):
        return f"class_weight is not None or a list of {classes} numbers"
    return None


PLAIN_TYPES = (bool, int, float, str, type(None))
MAX_LIST_ARGUMENT = 64  # layers or stages a network argument lists; the study's have 1 to 4


def preprocessing_problem(prep: dict[str, Any]) -> str | None:
    """What in a checkpoint's preprocessing is out of its bounds: these values size every tensor
    that evaluate, predict and export allocate, so they are checked like any option."""
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
    from xray_cls.core.task import MAX_CLASSES

    if prep.get("normalization", "train") not in ("train", "imagenet"):
        return f"preprocessing.normalization={str(prep['normalization'])[:50]!r} is not train or imagenet"
    names = prep.get("class_names")
    if type(names) is not list or not 2 <= len(names) <= MAX_CLASSES or not all(type(n) is str and 0 < len(n) <= 100 for n in names):
        return f"preprocessing.class_names is not a list of 2 to {MAX_CLASSES} class names"
    return task_problem(prep.get("task"), names)


def task_problem(record: Any, class_names: list[str]) -> str | None:
    """What is wrong with a checkpoint's task record (None: a checkpoint from before tasks, pneumonia)."""
    from xray_cls.core.task import PNEUMONIA, make_task

    if record is None:
        return None if class_names == list(PNEUMONIA.classes) else "preprocessing has no task for its class_names"
    kinds = {"name": str, "classes": list, "folders": list, "file_name_words": dict, "unknown": str}
    if type(record) is not dict or set(record) != set(kinds) or any(type(record[k]) is not t for k, t in kinds.items()):
        return "preprocessing.task is not a task record (name, classes, folders, file_name_words, unknown)"
    words = record["file_name_words"]
    if len(words) > 16 or not all(type(k) is str and type(v) is str for k, v in words.items()):
        return "preprocessing.task.file_name_words is not a mapping of class names to words"
    try:
        task = make_task(record, source="preprocessing.task")
    except UserInputError as err:
        return str(err)
    if list(task.classes) != class_names:
        return f"preprocessing.task names the classes {list(task.classes)}, its class_names {class_names}"
    return None


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
    from xray_cls.models.classifier import XrayClassifier

    checkpoint = read_checkpoint(path, option)
    hparams = checkpoint["hyper_parameters"]
    check_state_dict(hparams["net"], checkpoint["state_dict"], f"{option}={path}")
    trusted = ("net", "threshold", "pos_weight", "preprocessing", "threshold_rule", "temperature", "calibration",
               "class_weight")  # never optimizer or scheduler
    kept = {key: hparams[key] for key in trusted if key in hparams}
    if "preprocessing" in kept and kept["preprocessing"].get("task") is None:  # written before tasks: pneumonia
        from xray_cls.core.task import PNEUMONIA

        kept["preprocessing"] = {**kept["preprocessing"], "task": PNEUMONIA.record()}
    if "preprocessing" in kept and "normalization" not in kept["preprocessing"]:  # before pretrained networks
        kept["preprocessing"] = {**kept["preprocessing"], "normalization": "train"}
    try:
        module = XrayClassifier(**kept)
        module.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0]
        raise UserInputError(f"{option}={path} does not match the network it names ({reason[:200]})") from None
    return module.eval()


def check_state_dict(net_cfg: dict[str, Any], state_dict: Any, source: str) -> None:
    """The network `net_cfg` names, built on PyTorch's meta device (shapes, no memory), must have
    exactly the tensors of `state_dict` (under `net.`): so that arguments that would build a
    network far larger than the file (hidden=[1000000]) are refused before anything is allocated."""
    from xray_cls.models.networks import build_network

    try:
        with torch.device("meta"):
            expected = {f"net.{k}": tuple(v.shape) for k, v in build_network(net_cfg).state_dict().items()}
    except Exception as err:  # noqa: BLE001  any argument may be hostile: a failure of any kind is "not buildable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(f"{source} names a network that cannot be built ({reason[:200]})") from None
    held = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(k, str) and k.startswith("net.") and isinstance(v, torch.Tensor)}
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


def network_name(net_cfg: Any) -> str:
    """CNN for {"_target_": "xray_cls.models.networks.CNN", ...}, a dict or a DictConfig."""
    return str(net_cfg.get("_target_", "?")).rsplit(".", 1)[-1]
