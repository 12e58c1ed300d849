"""The report of a sweep: `python -m xray_cls.sweep_report SWEEP_DIR`, also written at the end of every multirun.

It reads only what the runs wrote (`.hydra/overrides.yaml`, `metrics.json` or `failed.json`,
`curves.csv`), whichever logger they used, so a copied sweep folder can be reported again, and writes `report.md`,
`summary.csv` and `figures/` into the sweep folder. The same runs give the same files.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from xray_cls.files import write_text

log = logging.getLogger(__name__)

# (key, header, which value is best); the keys are summary.csv's columns after run/status/overrides.
METRIC_COLUMNS = [
    ("params", "params", None),
    ("train_loss", "train loss", "min"),
    ("train_acc", "train acc", "max"),
    ("val_loss", "val loss", "min"),
    ("val_acc", "val acc", "max"),
    ("tn", "TN", None),
    ("fp", "FP", "min"),
    ("fn", "FN", "min"),
    ("tp", "TP", None),
    ("accuracy", "accuracy", "max"),
    ("precision", "precision", "max"),
    ("recall", "recall", "max"),
    ("specificity", "specificity", "max"),
    ("f1", "F1", "max"),
    ("auroc", "AUROC", "max"),
]
BAR_METRICS = ["accuracy", "precision", "recall", "specificity"]


@dataclass
class Run:
    name: str
    overrides: list[str]
    status: str  # "ok", "failed" or "incomplete" (interrupted, or still running)
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        m = self.metrics
        if not m:
            return {key: None for key, _, _ in METRIC_COLUMNS}
        last, cells = m["last_epoch"], m["confusion_matrix"]
        return {
            "params": m["params"]["total"],
            "train_loss": last.get("loss/train"),
            "train_acc": last.get("acc/train"),
            "val_loss": last.get("loss/val"),
            "val_acc": last.get("acc/val"),
            **{k: cells[k] for k in ("tn", "fp", "fn", "tp")},
            **{k: m["test"][k] for k in ("accuracy", "precision", "recall", "specificity", "f1", "auroc")},
        }


def find_run_dirs(sweep_dir: Path) -> list[Path]:
    """Hydra's run folders (those with .hydra/overrides.yaml), in job order."""
    dirs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    return sorted(dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def read_curves(run_dir: Path, tags: tuple[str, ...] = ("acc/val", "loss/val")) -> dict[str, list[float]]:
    """Per-epoch values of `tags` from the run's curves.csv, written whichever logger ran."""
    from xray_cls.loggers import CURVES_FILE, read_epoch_curves

    if not (run_dir / CURVES_FILE).is_file():
        return {}
    rows = [row for _, row in sorted(read_epoch_curves(run_dir / CURVES_FILE).items())]
    return {tag: [row[tag] for row in rows if tag in row] for tag in tags if any(tag in row for row in rows)}


def read_run(run_dir: Path) -> Run:
    overrides = [str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
    run = Run(name=run_dir.name, overrides=overrides, status="incomplete")
    if (run_dir / "metrics.json").is_file():
        run.status, run.metrics = "ok", json.loads((run_dir / "metrics.json").read_text())
    elif (run_dir / "failed.json").is_file():
        run.status, run.error = "failed", json.loads((run_dir / "failed.json").read_text())["error"]
    else:
        run.error = "no metrics.json: the run was interrupted or is still running"
    run.curves = read_curves(run_dir)
    return run


def varying_overrides(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """(overrides common to every run, each run's other overrides)."""
    common = [o for o in runs[0].overrides if all(o in r.overrides for r in runs)] if runs else []
    return common, [[o for o in r.overrides if o not in common] for r in runs]


def best_values(rows: list[dict[str, Any]]) -> dict[str, Any]:
    best = {}
    for key, _, better in METRIC_COLUMNS:
        values = [r[key] for r in rows if r[key] is not None and not math.isnan(r[key])]
        if better and values:
            best[key] = max(values) if better == "max" else min(values)
    return best


def _cell(value: Any, is_best: bool) -> str:
    if value is None:
        return ""
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    return f"**{text}**" if is_best else text


def write_summary_csv(path: Path, runs: list[Run]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "status", "overrides", *(k for k, _, _ in METRIC_COLUMNS), "error"])
        for run in runs:
            row = run.row()
            writer.writerow([run.name, run.status, " ".join(run.overrides), *(row[k] for k, _, _ in METRIC_COLUMNS), run.error])


def write_markdown(path: Path, sweep_dir: Path, runs: list[Run], figures: list[str]) -> None:
    common, varying = varying_overrides(runs)
    rows = [run.row() for run in runs]
    best = best_values(rows)
    n_ok = sum(r.status == "ok" for r in runs)
    lines = [
        f"# Sweep report: {sweep_dir.name}",
        "",
        f"{len(runs)} runs: {n_ok} finished, {sum(r.status == 'failed' for r in runs)} failed, "
        f"{sum(r.status == 'incomplete' for r in runs)} incomplete. Test metrics are of each run's best "
        "checkpoint; train and val columns are of its last epoch. The best value of each column is in bold.",
        "",
        f"Overrides common to all runs: `{' '.join(common)}`" if common else "No overrides common to all runs.",
        "",
        "| run | overrides | status | " + " | ".join(h for _, h, _ in METRIC_COLUMNS) + " |",
        "|" + " --- |" * (3 + len(METRIC_COLUMNS)),
    ]
    for run, own, row in zip(runs, varying, rows):
        cells = [_cell(row[k], row[k] is not None and row[k] == best.get(k)) for k, _, _ in METRIC_COLUMNS]
        lines.append(f"| {run.name} | `{' '.join(own)}` | {run.status} | " + " | ".join(cells) + " |")
    problems = [r for r in runs if r.status != "ok"]
    if problems:
        lines += ["", "## Runs without results", ""]
        lines += [f"- run {r.name} ({r.status}): {r.error}" for r in problems]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{name.removesuffix('.png').replace('_', ' ')}](figures/{name})" for name in figures]
    write_text(path, "\n".join(lines) + "\n")


def curves_figure(runs: list[Run], tag: str, ylabel: str) -> Any:
    from matplotlib.figure import Figure

    from matplotlib import colormaps

    colors = colormaps["tab10" if len(runs) <= 10 else "tab20"]  # one distinct colour per run
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        values = run.curves.get(tag)
        if values:
            x = range(1, len(values) + 1)
            ax.plot(x, values, marker="o", markersize=3, color=colors(i % colors.N), label=f"run {run.name}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncols=2)
    return fig


def confusion_grid_figure(runs: list[Run]) -> Any:
    from matplotlib.figure import Figure

    from xray_cls.run_report import draw_confusion_matrix

    ncols = min(4, len(runs))
    nrows = math.ceil(len(runs) / ncols)
    fig = Figure(figsize=(3 * ncols, 2.8 * nrows), layout="constrained")
    for i, run in enumerate(runs):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        draw_confusion_matrix(ax, run.metrics["confusion_matrix"]["matrix"], run.metrics["class_names"], "small")
        ax.set_title(f"run {run.name}", fontsize="small")
    fig.supxlabel("predicted")
    fig.supylabel("true")
    return fig


def scores_bar_figure(runs: list[Run]) -> Any:
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6, 0.9 * len(runs) + 2), 4), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(runs))
    width = 0.8 / len(BAR_METRICS)
    for i, metric in enumerate(BAR_METRICS):
        ax.bar(x + (i - (len(BAR_METRICS) - 1) / 2) * width, [r.metrics["test"][metric] for r in runs], width, label=metric)
    ax.set_xticks(x, [f"run {r.name}" for r in runs], fontsize="small")
    ax.set_ylim(0, 1.2)  # headroom for the legend
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("test")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=4, loc="upper center")
    return fig


def write_figures(folder: Path, runs: list[Run]) -> list[str]:
    finished = [r for r in runs if r.status == "ok"]
    if not finished:
        return []
    folder.mkdir(exist_ok=True)
    figures = {
        "val_accuracy.png": curves_figure(finished, "acc/val", "val accuracy"),
        "val_loss.png": curves_figure(finished, "loss/val", "val loss"),
        "confusion_matrices.png": confusion_grid_figure(finished),
        "test_metrics.png": scores_bar_figure(finished),
    }
    for name, fig in figures.items():
        fig.savefig(folder / name, dpi=100, metadata={"Software": None})
    return list(figures)


def write_report(sweep_dir: Path) -> Path:
    """(Re)writes report.md, summary.csv and figures/ of a sweep folder; returns report.md's path."""
    from xray_cls.errors import UserInputError

    if not sweep_dir.is_dir():
        raise UserInputError(f"{sweep_dir} is not a folder; expected a sweep folder such as outputs/multirun/<date>/<time>")
    runs = [read_run(d) for d in find_run_dirs(sweep_dir)]
    if not runs:
        raise UserInputError(f"{sweep_dir} holds no runs; expected Hydra run folders with .hydra/overrides.yaml inside")
    figures = write_figures(sweep_dir / "figures", runs)
    write_summary_csv(sweep_dir / "summary.csv", runs)
    report = sweep_dir / "report.md"
    write_markdown(report, sweep_dir, runs, figures)
    return report


class SweepReport(Callback):
    """Hydra callback (see conf/train.yaml): writes the report when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report = write_report(Path(config.hydra.sweep.dir))
        log.info("sweep report: %s", report)


def main(argv: list[str] | None = None) -> None:
    from xray_cls.errors import UserInputError

    parser = argparse.ArgumentParser(prog="python -m xray_cls.sweep_report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. outputs/multirun/<date>/<time>")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.sweep_dir))
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
