"""The course report this project grew out of, side by side with runs of `+experiment=report`.

Its figures live in `bundled/course_report.yaml` (with their source); each run of the experiment
names its row by its `+report_run=<name>` override. The sweep report calls `comparison_section`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

from xray_cls.core.untrusted import markdown_text

FIGURES = Path(__file__).parent.parent / "bundled" / "course_report.yaml"


# (our metrics.json: last_epoch key or test key, the report's key, header)
COLUMNS = [
    ("loss/train", "train_loss", "train loss"),
    ("acc/train", "train_acc", "train acc"),
    ("loss/val", "val_loss", "val loss"),
    ("acc/val", "val_acc", "val acc"),
    ("recall", "test_recall", "test recall"),
    ("precision", "test_precision", "test precision"),
]


DIFFERENCES = (
    "Where the two can differ. **Val**: here a patient-level split of train (`data.val_fraction` of "
    "train's patients per class, so no patient is on both sides); the report's was a share of its "
    "train images. **Test**: here the folder's own `test/`, or, for a folder with `train/` alone, a "
    "development test drawn from train's patients (`data.test_fraction`); the report's was Kaggle's "
    "separately collected test folder, whose images differ from train's more than any split of "
    "train does, so a development test scores far higher precision than the report's 0.62-0.82. "
    "**Weights**: both test the last epoch's (`checkpoint.test=last`), at a threshold of 0.5. "
    "**Images**: the report's Keras pipeline resized the original images to 256x256; a folder "
    "that was already resized (the 224 px redistribution) is upscaled to 256 here."
)


@cache
def report_figures() -> dict[str, Any]:
    """The bundled figures (a file of this package: trusted)."""
    return yaml.safe_load(FIGURES.read_text())


def report_row(overrides: list[str]) -> str | None:
    """The report's row a run reproduces, from its `+report_run=<name>` override; None for other runs."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "report_run" and value in report_figures()["runs"]:
            return value
    return None


def comparison_section(runs: list[Any]) -> list[str]:
    """Markdown lines: each report run's last-epoch and test figures beside the report's (ours / the
    report's), then where the two can differ; no lines when no run reproduces a report run."""
    rows = [(run, report_row(run.overrides)) for run in runs if run.status == "ok"]
    figures = report_figures()
    order = list(figures["runs"])
    rows = sorted(((run, name) for run, name in rows if name), key=lambda pair: order.index(pair[1]))  # the report's order
    if not rows:
        return []
    lines = [
        "## Beside the course report",
        "",
        f"Each cell: this run / the report ({markdown_text(figures['source'])}). Last epoch's train and val, "
        "then the test split, PNEUMONIA positive.",
        "",
        "| report run | run | params | " + " | ".join(header for _, _, header in COLUMNS) + " |",
        "|" + " --- |" * (3 + len(COLUMNS)),
    ]
    for run, name in rows:
        reported = figures["runs"][name]
        ours = {**run.metrics["last_epoch"], **run.metrics["test"]}
        cells = [_pair(ours.get(key), reported[theirs]) for key, theirs, _ in COLUMNS]
        params = f"{run.metrics['params']['total']:,} / {reported['parameters']:,}"
        lines.append(f"| {markdown_text(reported['label'])} | {markdown_text(run.name)} | {params} | " + " | ".join(cells) + " |")
    return [*lines, "", DIFFERENCES]


def _pair(ours: float | None, theirs: float) -> str:
    return f"{'' if ours is None else f'{ours:.4f}'} / {theirs:.4f}"
