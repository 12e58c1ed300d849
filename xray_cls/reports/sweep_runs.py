"""The runs of a sweep folder, read as untrusted data: each run's overrides, metrics.json or
failed.json and curves.csv, every field checked; a run whose files break a rule is `unreadable`,
naming the file and why. The sweep report (`sweep`) is written from these."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xray_cls.core.files import path_text
from xray_cls.core.task import MAX_CLASSES  # the confusion matrix a run's metrics.json may hold is at most this square
from xray_cls.core.untrusted import (
    CURVES_FILE,
    UnreadableFile,
    one_line,
    read_epoch_curves,
    read_json,
    read_string_list,
    value_at,
)

log = logging.getLogger(__name__)


# (key, header); the keys are summary.csv's columns after run/status/overrides/val_rank. Runs are
# ranked by best_val alone, the score of the checkpoint each run chose on val: the train and val
# columns of the last epoch and the test columns are reported, never compared.
METRIC_COLUMNS = [
    ("best_val", "best val score"),
    ("params", "params"),
    ("train_loss", "train loss (last epoch)"),
    ("train_acc", "train acc (last epoch)"),
    ("val_loss", "val loss (last epoch)"),
    ("val_acc", "val acc (last epoch)"),
    ("threshold", "threshold"),
    ("tn", "TN"),
    ("fp", "FP"),
    ("fn", "FN"),
    ("tp", "TP"),
    ("accuracy", "test accuracy"),
    ("precision", "test precision"),
    ("recall", "test recall"),
    ("specificity", "test specificity"),
    ("f1", "test F1"),
    ("auroc", "test AUROC"),
]


TEST_SCORES = ["accuracy", "precision", "recall", "specificity", "f1", "auroc"]
CELLS = ("tn", "fp", "fn", "tp")  # two classes' matrix; three or more leave these columns empty


@dataclass
class Run:
    name: str
    overrides: list[str]
    status: str  # "ok", "failed", "incomplete" (interrupted, or still running) or "unreadable"
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        m = self.metrics
        if not m:
            return {key: None for key, _ in METRIC_COLUMNS}
        last, cells = m["last_epoch"], m["confusion_matrix"]
        return {
            "best_val": m["best_checkpoint"]["score"],
            "params": m["params"]["total"],
            "train_loss": last.get("loss/train"),
            "train_acc": last.get("acc/train"),
            "val_loss": last.get("loss/val"),
            "val_acc": last.get("acc/val"),
            "threshold": m["threshold"],
            **{k: cells.get(k) for k in CELLS},
            **{k: m["test"][k] for k in TEST_SCORES},
        }

    def val_choice(self) -> tuple[str, str, float] | None:
        """(monitor, mode, best checkpoint's score) of a finished run that has a best checkpoint."""
        if self.status != "ok" or not math.isfinite(self.metrics["best_checkpoint"]["score"] or math.nan):
            return None
        best = self.metrics["best_checkpoint"]
        mode = best.get("mode") or ("min" if "loss" in best["monitor"] else "max")  # metrics.json before `mode`
        return best["monitor"], mode, best["score"]


def find_run_dirs(sweep_dir: Path) -> list[Path]:
    """Hydra's run folders (those with .hydra/overrides.yaml), in job order."""
    dirs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    def job_order(path: Path) -> tuple[bool, int, str]:
        number = path.name.isascii() and path.name.isdigit()
        return not number, int(path.name) if number else 0, path.name

    return sorted(dirs, key=job_order)


def read_curves(run_dir: Path, tags: tuple[str, ...] = ("acc/val", "loss/val")) -> dict[str, list[float]]:
    """Per-epoch values of `tags` from the run's curves.csv, written whichever logger ran."""
    if not (run_dir / CURVES_FILE).exists():
        return {}
    rows = [row for _, row in sorted(read_epoch_curves(run_dir / CURVES_FILE).items())]
    return {tag: [row[tag] for row in rows if tag in row] for tag in tags if any(tag in row for row in rows)}


def read_run(run_dir: Path) -> Run:
    """A run folder's record; a file that is not what a run writes makes it `unreadable`."""
    run = Run(name=path_text(run_dir.name), overrides=[], status="incomplete")
    try:
        if run_dir.is_symlink() or (run_dir / ".hydra").is_symlink():
            raise UnreadableFile(run_dir, "is a symbolic link; only the sweep folder's own run folders are read")
        run.overrides = read_string_list(run_dir / ".hydra" / "overrides.yaml")
        if (run_dir / "metrics.json").exists():
            run.status, run.metrics = "ok", checked_metrics(read_json(run_dir / "metrics.json"), run_dir / "metrics.json")
        elif (run_dir / "failed.json").exists():
            run.status = "failed"
            run.error = one_line(value_at(read_json(run_dir / "failed.json"), run_dir / "failed.json", "error", kind=str))
        else:
            run.error = "no metrics.json: the run was interrupted or is still running"
        run.curves = read_curves(run_dir)
    except UnreadableFile as err:
        log.warning("sweep report: run %s is unreadable: %s", run.name, err)
        return Run(name=run.name, overrides=run.overrides, status="unreadable", error=one_line(str(err)))
    return run


def checked_metrics(data: Any, path: Path) -> dict[str, Any]:
    """The parts of a run's metrics.json that the report uses, each checked to be what a run writes."""
    class_names = value_at(data, path, "class_names", kind=list)
    matrix = value_at(data, path, "confusion_matrix", "matrix", kind=list)
    if not 2 <= len(class_names) <= MAX_CLASSES or not all(isinstance(n, str) for n in class_names):
        raise UnreadableFile(path, f"class_names is not a list of 2 to {MAX_CLASSES} names")
    binary = len(class_names) == 2
    square = all(isinstance(row, list) and len(row) == len(class_names) for row in matrix) and len(matrix) == len(class_names)
    if not square or not all(type(n) is int and n >= 0 for row in matrix for n in row):
        raise UnreadableFile(path, f"confusion_matrix.matrix is not a {len(class_names)}x{len(class_names)} matrix of counts")
    last_epoch = value_at(data, path, "last_epoch", kind=dict)
    mode = value_at(data, path, "best_checkpoint", "mode", kind=str, optional=True)
    if mode not in (None, "min", "max"):
        raise UnreadableFile(path, "best_checkpoint.mode is neither min nor max")
    return {
        "class_names": [one_line(n, 60) for n in class_names],
        "confusion_matrix": {"matrix": matrix, **({k: value_at(data, path, "confusion_matrix", k, kind=int) for k in CELLS} if binary else {})},
        "last_epoch": {k: value_at(last_epoch, path, k) for k in ("loss/train", "acc/train", "loss/val", "acc/val") if k in last_epoch},
        "best_checkpoint": {
            "score": value_at(data, path, "best_checkpoint", "score", optional=True),
            "monitor": one_line(value_at(data, path, "best_checkpoint", "monitor", kind=str), 60),
            "mode": mode,
        },
        "params": {"total": value_at(data, path, "params", "total", kind=int)},
        # three or more classes have no threshold: each image is called its most probable class
        "threshold": value_at(data, path, "threshold") if binary else None,
        "threshold_rule": {"rule": one_line(value_at(data, path, "threshold_rule", "rule", kind=str), 60) if binary else "argmax"},
        "test": {k: value_at(data, path, "test", k) for k in TEST_SCORES},
    }
