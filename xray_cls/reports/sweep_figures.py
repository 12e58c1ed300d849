"""The sweep report's figures: val curves, every run's confusion matrix, the test scores side by side."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xray_cls.core.files import atomic_write
from xray_cls.core.untrusted import plot_text

if TYPE_CHECKING:
    from xray_cls.reports.sweep_runs import Run

log = logging.getLogger(__name__)


BAR_METRICS = ["accuracy", "precision", "recall", "specificity"]


def curves_figure(runs: list[Run], tag: str, ylabel: str) -> Any:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    colors = colormaps["tab10" if len(runs) <= 10 else "tab20"]  # one distinct colour per run
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        values = run.curves.get(tag)
        if values:
            x = range(1, len(values) + 1)
            ax.plot(x, values, marker="o", markersize=3, color=colors(i % colors.N), label=f"run {plot_text(run.name)}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncols=2)
    return fig


def confusion_grid_figure(runs: list[Run]) -> Any:
    from matplotlib.figure import Figure

    from xray_cls.reports.figures import draw_confusion_matrix

    ncols = min(4, len(runs))
    nrows = math.ceil(len(runs) / ncols)
    fig = Figure(figsize=(3 * ncols, 2.8 * nrows), layout="constrained")
    for i, run in enumerate(runs):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        names = [plot_text(n) for n in run.metrics["class_names"]]
        draw_confusion_matrix(ax, run.metrics["confusion_matrix"]["matrix"], names, "small")
        ax.set_title(f"run {plot_text(run.name)}", fontsize="small")
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
    ax.set_xticks(x, [f"run {plot_text(r.name)}" for r in runs], fontsize="small")
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
        with atomic_write(folder / name) as tmp:  # replaces a link of that name instead of writing through it
            fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    return list(figures)
