"""The report of a sweep: `python -m xray_cls.sweep_report SWEEP_DIR`, also written at the end of every multirun.

It reads only what the runs wrote (`.hydra/overrides.yaml`, `metrics.json` or `failed.json`,
`curves.csv`), whichever logger they used, so a copied sweep folder can be reported again, and writes `report.md`,
`summary.csv` and `figures/` into the sweep folder. The same runs give the same files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from xray_cls.files import write_csv, write_text

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
            **{k: cells[k] for k in ("tn", "fp", "fn", "tp")},
            **{k: m["test"][k] for k in TEST_SCORES},
        }

    def val_choice(self) -> tuple[str, str, float] | None:
        """(monitor, mode, best checkpoint's score) of a finished run that has a best checkpoint."""
        if self.status != "ok" or self.metrics["best_checkpoint"]["score"] is None:
            return None
        best = self.metrics["best_checkpoint"]
        mode = best.get("mode") or ("min" if "loss" in best["monitor"] else "max")  # metrics.json before `mode`
        return best["monitor"], mode, best["score"]


@dataclass
class Ranking:
    """The runs ordered by the val metric that chose their checkpoints, best first."""

    monitor: str | None  # None when the runs chose by different val metrics: then nothing is ranked
    mode: str | None
    ranked: list[Run]
    why_unranked: str = ""

    def rank(self, run: Run) -> int | None:
        return next((i + 1 for i, ranked in enumerate(self.ranked) if ranked is run), None)


def rank_on_val(runs: list[Run]) -> Ranking:
    """Ranks the finished runs by their best checkpoint's val score (ties keep the job order)."""
    choices = {r.name: r.val_choice() for r in runs}
    scored = [r for r in runs if choices[r.name] is not None]
    metrics = sorted({choices[r.name][:2] for r in scored})
    if not scored:
        return Ranking(None, None, [], "no run finished with a best checkpoint")
    if len(metrics) > 1:
        named = ", ".join(f"{m} ({mode})" for m, mode in metrics)
        return Ranking(None, None, [], f"the runs chose their checkpoints by different val metrics: {named}")
    monitor, mode = metrics[0]
    ranked = sorted(scored, key=lambda r: choices[r.name][2] * (-1 if mode == "max" else 1))
    return Ranking(monitor, mode, ranked)


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


def _cell(value: Any, is_best: bool) -> str:
    if value is None:
        return ""
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    return f"**{text}**" if is_best else text


def write_summary_csv(path: Path, runs: list[Run], ranking: Ranking) -> None:
    columns = ["run", "status", "overrides", "val_rank", *(k for k, _ in METRIC_COLUMNS), "error"]
    rows = (
        {"run": r.name, "status": r.status, "overrides": " ".join(r.overrides), "val_rank": ranking.rank(r), **r.row(), "error": r.error}
        for r in runs
    )
    write_csv(path, rows, columns)


def write_markdown(path: Path, sweep_dir: Path, runs: list[Run], ranking: Ranking, figures: list[str]) -> None:
    common, varying = varying_overrides(runs)
    own = {run.name: overrides for run, overrides in zip(runs, varying)}
    order = ranking.ranked + [r for r in runs if r not in ranking.ranked]
    n_ok = sum(r.status == "ok" for r in runs)
    if ranking.monitor:
        how = (
            f"Runs are ranked by {ranking.monitor} ({ranking.mode}) of the checkpoint each one chose on val (best val "
            "score); the best is in bold. The last epoch's train and val columns and every test column are reported, "
            "not ranked: test figures are never the basis of a choice."
        )
    else:
        how = f"No run is ranked: {ranking.why_unranked}."
    lines = [
        f"# Sweep report: {sweep_dir.name}",
        "",
        f"{len(runs)} runs: {n_ok} finished, {sum(r.status == 'failed' for r in runs)} failed, "
        f"{sum(r.status == 'incomplete' for r in runs)} incomplete. {how}",
        "",
        f"Overrides common to all runs: `{' '.join(common)}`" if common else "No overrides common to all runs.",
        "",
        *chosen_on_val(ranking, own),
        "| val rank | run | overrides | status | " + " | ".join(h for _, h in METRIC_COLUMNS) + " |",
        "|" + " --- |" * (4 + len(METRIC_COLUMNS)),
    ]
    for run in order:
        row, rank = run.row(), ranking.rank(run)
        cells = [_cell(row[k], k == "best_val" and rank == 1) for k, _ in METRIC_COLUMNS]
        lines.append(f"| {rank or ''} | {run.name} | `{' '.join(own[run.name])}` | {run.status} | " + " | ".join(cells) + " |")
    problems = [r for r in runs if r.status != "ok"]
    if problems:
        lines += ["", "## Runs without results", ""]
        lines += [f"- run {r.name} ({r.status}): {r.error}" for r in problems]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{name.removesuffix('.png').replace('_', ' ')}](figures/{name})" for name in figures]
    write_text(path, "\n".join(lines) + "\n")


def chosen_on_val(ranking: Ranking, own: dict[str, list[str]]) -> list[str]:
    """The run chosen on val and its test figures, reported once."""
    if not ranking.ranked:
        return []
    run = ranking.ranked[0]
    m = run.metrics
    scores = ", ".join(f"{name} {m['test'][name]:.4f}" for name in TEST_SCORES)
    rule = m["threshold_rule"]["rule"]
    return [
        "## Chosen on val",
        "",
        f"Run {run.name} (`{' '.join(own[run.name]) or 'no own overrides'}`): {ranking.monitor} "
        f"{m['best_checkpoint']['score']:.4f} at its best checkpoint, the {'lowest' if ranking.mode == 'min' else 'highest'} "
        f"of {len(ranking.ranked)} finished run(s).",
        f"Its test figures, at threshold {m['threshold']:.4f} ({rule}): {scores}.",
        "",
    ]


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
    ranking = rank_on_val(runs)
    write_summary_csv(sweep_dir / "summary.csv", runs, ranking)
    report = sweep_dir / "report.md"
    write_markdown(report, sweep_dir, runs, ranking, figures)
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
