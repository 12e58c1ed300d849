"""The sweep report's cross-validation section: runs of `+experiment=cv` (or any sweep over
`data.fold`), grouped by their other overrides, each group's mean and standard deviation over its
folds. The sweep report calls `cross_validation_section`.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from xray_cls.core.untrusted import markdown_code

FOLD_OVERRIDE = re.compile(r"^\+*data\.fold=(\d+)$")


# The sweep summary's columns summarized over folds: the val score each run chose its checkpoint
# by, its last epoch's val figures, and the test figures (reported, never compared to choose).
SUMMARIZED = ("best_val", "val_loss", "val_acc", "accuracy", "precision", "recall", "specificity", "f1", "auroc")


def fold_of(overrides: list[str]) -> int | None:
    found = [FOLD_OVERRIDE.match(o) for o in overrides]
    return next((int(m.group(1)) for m in found if m), None)


def configurations(runs: list[Any]) -> dict[tuple[str, ...], list[tuple[int, Any]]]:
    """The finished runs that have a data.fold override, by their other overrides, in fold order."""
    groups: dict[tuple[str, ...], list[tuple[int, Any]]] = {}
    for run in runs:
        fold = fold_of(run.overrides)
        if run.status == "ok" and fold is not None:
            key = tuple(o for o in run.overrides if not FOLD_OVERRIDE.match(o))
            groups.setdefault(key, []).append((fold, run))
    return {key: sorted(members, key=lambda m: m[0]) for key, members in groups.items()}


def spread(values: list[float | None]) -> str:
    """mean ± standard deviation (sample) of the values a run has."""
    present = [v for v in values if isinstance(v, (int, float))]
    if not present:
        return ""
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return f"{statistics.mean(present):.4f} ± {std:.4f}"


def cross_validation_section(runs: list[Any], metric_columns: list[tuple[str, str]]) -> list[str]:
    """Markdown lines of the section, or none when no run names a fold; `metric_columns`: the
    sweep summary's (key, header) pairs, of which the SUMMARIZED ones are shown."""
    groups = configurations(runs)
    columns = [(k, h) for k, h in metric_columns if k in SUMMARIZED]
    if not groups:
        return []
    common = set.intersection(*(set(key) for key in groups))  # shown once, not in every row
    lines = [
        "## Cross-validation",
        "",
        "Each configuration's runs over its folds (val: that fold of train's patients; test: the same split for every "
        "fold), mean ± standard deviation. Test figures are reported, not compared to choose.",
        "",
        "| configuration | folds | " + " | ".join(h for _, h in columns) + " |",
        "|" + " --- |" * (2 + len(columns)),
    ]
    for key, members in groups.items():
        own = [o for o in key if o not in common]
        rows = [run.row() for _, run in members]
        cells = [spread([row[k] for row in rows]) for k, _ in columns]
        name = markdown_code(" ".join(own)) if own else "all runs"
        folds = ", ".join(str(f) for f, _ in members)
        lines.append(f"| {name} | {folds} | " + " | ".join(cells) + " |")
    if common:
        lines += ["", f"Overrides of every configuration: {markdown_code(' '.join(sorted(common)))}"]
    return lines
