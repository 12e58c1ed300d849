"""The test figures of a run or an evaluation: the confusion matrix, ROC and precision-recall
curves, the reliability diagram, saved whole (atomically) as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def draw_confusion_matrix(ax: Any, matrix: list[list[int]], class_names: list[str], fontsize: str = "medium") -> Any:
    """The counts as a heat map with each cell's number on it; returns the image for a colorbar."""
    counts = np.asarray(matrix)
    image = ax.imshow(counts, cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, fontsize=fontsize)
    ax.set_yticks(ticks, class_names, fontsize=fontsize)
    for (row, col), count in np.ndenumerate(counts):
        dark = count > counts.max() / 2
        ax.text(col, row, str(count), ha="center", va="center", color="white" if dark else "black")
    return image


def confusion_matrix_figure(matrix: list[list[int]], class_names: list[str]) -> Figure:
    from matplotlib.figure import Figure  # imported when a run ends, not at start-up

    fig = Figure(figsize=(4.2, 3.8), layout="constrained")
    ax = fig.add_subplot()
    fig.colorbar(draw_confusion_matrix(ax, matrix, class_names), ax=ax, shrink=0.8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test confusion matrix (n={np.asarray(matrix).sum()})")
    return fig


def curve_figure(x: torch.Tensor | list[torch.Tensor], y: torch.Tensor | list[torch.Tensor], xlabel: str, ylabel: str,
                 title: str, names: list[str] | None = None) -> Figure:
    """One curve; or, given lists and the class `names`, one curve per class (one vs the rest)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), layout="constrained")
    ax = fig.add_subplot()
    if isinstance(x, list):
        for xs, ys, name in zip(x, y, names or []):
            ax.plot(xs.numpy(), ys.numpy(), label=f"{name} vs rest")
        ax.legend(fontsize="small")
    else:
        ax.plot(x.numpy(), y.numpy())
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def reliability_figure(calibration: dict[str, Any], positive: str | None) -> Figure:
    """Fraction of positive (PNEUMONIA) images against the mean probability, per bin, for test (and
    val); K classes (`positive` None): the fraction called right against the top-class probability."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfectly calibrated")
    for name, bins in calibration["reliability"].items():
        points = [(m, f) for m, f in zip(bins["mean_probability"], bins["fraction_positive"]) if m is not None]
        ax.plot(*zip(*points), marker="o", label=f"{name} (ECE {calibration[f'{name}_ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"mean predicted probability of {positive}" if positive else "mean top-class probability")
    ax.set_ylabel(f"fraction {positive}" if positive else "fraction called right")
    temperature = calibration["temperature"]
    ax.set_title(f"reliability, {calibration['bins']} bins" + (f", temperature {temperature:.3f}" if temperature != 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    return fig


def make_test_figures(results: dict[str, Any], class_names: list[str]) -> dict[str, Figure]:
    fpr, tpr = results["roc"]
    precision, recall = results["pr_curve"]
    scores = results["scores"]
    macro = " macro" if len(class_names) > 2 else ""
    return {
        "confusion_matrix": confusion_matrix_figure(results["confusion_matrix"], class_names),
        "roc_curve": curve_figure(fpr, tpr, "false positive rate", "true positive rate", f"ROC (AUROC{macro} {scores['auroc']:.3f})",
                                  class_names),
        "pr_curve": curve_figure(recall, precision, "recall", "precision", "precision-recall", class_names),
    }


def save_figures(figures: dict[str, Figure], folder: Path) -> None:
    """Each figure as folder/<name>.png (the loggers get them through `xray_cls.training.loggers.log_figures`)."""
    from xray_cls.core.files import atomic_write

    for name, fig in figures.items():
        with atomic_write(folder / f"{name}.png") as tmp:  # a stopped run leaves whole figures or none
            fig.savefig(tmp, format="png", dpi=120)
