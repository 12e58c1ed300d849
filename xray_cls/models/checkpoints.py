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

from pathlib import Path
from typing import TYPE_CHECKING, Any

from xray_cls.core.errors import UserInputError
from xray_cls.core.legacy_names import forwarding
from xray_cls.models.untrusted_files import check_state_dict, is_plain, kind_of, load_plain, network_problem, pixels_problem

if TYPE_CHECKING:
    from xray_cls.models.classifier import XrayClassifier


EXPECTED = "a .ckpt file written by an xray_cls run (outputs/<run>/checkpoints/best.ckpt or last.ckpt)"


def read_checkpoint(path: str | Path, option: str = "ckpt") -> dict[str, Any]:
    """The checkpoint at `path` as a dict, or one UserInputError naming `option`, the path and what is wrong."""
    checkpoint = load_plain(path, option, EXPECTED)
    path = Path(path).expanduser()
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if isinstance(hparams, dict) and "method" in hparams:
        raise UserInputError(f"{option}={path} is a checkpoint of a pretraining (python -m xray_cls.pretrain), not of a "
                             "classifier; fine-tune its run's backbone.pth with model.weights=<run>/backbone.pth")
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
    net = hparams["net"]
    problem = network_problem(net)
    if problem:
        return problem
    threshold = hparams.get("threshold", 0.5)
    if type(threshold) not in (int, float) or not 0 <= threshold <= 1:
        return f"threshold is {kind_of(threshold) if type(threshold) not in (int, float) else threshold}, not a number in [0, 1]"
    temperature = hparams.get("temperature", 1.0)
    if type(temperature) not in (int, float) or not 0 < temperature < float("inf"):
        return f"temperature is {kind_of(temperature) if type(temperature) not in (int, float) else temperature}, not a positive number"
    if type(hparams.get("pos_weight")) not in (int, float, type(None)):
        return f"pos_weight is {kind_of(hparams['pos_weight'])}, not a number or None"
    from xray_cls.core.task import MAX_CLASSES

    classes = net.get("num_classes", 2)
    if type(classes) is not int or not 2 <= classes <= MAX_CLASSES:
        return f"net.num_classes={str(classes)[:20]} is not an integer from 2 to {MAX_CLASSES}"
    for group in ("preprocessing", "threshold_rule"):
        for key, value in (hparams.get(group) or {}).items():
            if not is_plain(value, lists=True) and (group, key) != ("preprocessing", "task"):  # the task: task_problem
                return f"{group}.{key} is {kind_of(value)}, not a number, string or a list of those"
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


# whose pixel statistics a model normalizes by: its train split's, ImageNet's, or its pretraining's images
NORMALIZATIONS = ("train", "imagenet", "pretraining")
def preprocessing_problem(prep: dict[str, Any]) -> str | None:
    """What in a checkpoint's preprocessing is out of its bounds: these values size every tensor
    that evaluate, predict and export allocate, so they are checked like any option."""
    problem = pixels_problem(prep)
    if problem:
        return problem
    from xray_cls.core.task import MAX_CLASSES

    if prep.get("normalization", "train") not in NORMALIZATIONS:
        return f"preprocessing.normalization={str(prep['normalization'])[:50]!r} is not one of {', '.join(NORMALIZATIONS)}"
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


__getattr__ = forwarding(__name__)  # the checks that moved to models.untrusted_files, from there
