"""The report of a sweep: `python -m xray_cls.sweep_report SWEEP_DIR`, also written at the end of every multirun.

It reads only what the runs wrote (`.hydra/overrides.yaml`, `metrics.json` or `failed.json`,
`curves.csv`), whichever logger they used, so a copied sweep folder can be reported again, and writes `report.md`,
`summary.csv` and `figures/` into the sweep folder. The same runs give the same files.

A sweep folder may come from someone else, so its files are data from a stranger
(`xray_cls.untrusted`): bounded in size and depth, YAML without tags or aliases, nothing resolved
or instantiated, each field checked. A run whose files break a rule is a row marked unreadable,
naming the file and why, and the report goes on. Strings from the runs are escaped in report.md,
and nothing is written outside the sweep folder.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from xray_cls import course_report
from xray_cls.cross_validation import cross_validation_section
from xray_cls.files import atomic_write, path_text, write_csv, write_text
from xray_cls.task import MAX_CLASSES  # the confusion matrix a run's metrics.json may hold is at most this square
from xray_cls.untrusted import UnreadableFile, markdown_code, value_at, markdown_text, one_line, plot_text, read_json, read_string_list

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
BAR_METRICS = ["accuracy", "precision", "recall", "specificity"]


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
    def job_order(path: Path) -> tuple[bool, int, str]:
        number = path.name.isascii() and path.name.isdigit()
        return not number, int(path.name) if number else 0, path.name

    return sorted(dirs, key=job_order)


def read_curves(run_dir: Path, tags: tuple[str, ...] = ("acc/val", "loss/val")) -> dict[str, list[float]]:
    """Per-epoch values of `tags` from the run's curves.csv, written whichever logger ran."""
    from xray_cls.loggers import CURVES_FILE, read_epoch_curves

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
        f"# Sweep report: {markdown_text(path_text(sweep_dir.name))}",
        "",
        f"{len(runs)} runs: {n_ok} finished, {sum(r.status == 'failed' for r in runs)} failed, "
        f"{sum(r.status == 'incomplete' for r in runs)} incomplete, {sum(r.status == 'unreadable' for r in runs)} unreadable. "
        f"{markdown_text(how)}",
        "",
        f"Overrides common to all runs: {markdown_code(' '.join(common))}" if common else "No overrides common to all runs.",
        "",
        *chosen_on_val(ranking, own),
        "| val rank | run | overrides | status | " + " | ".join(h for _, h in METRIC_COLUMNS) + " |",
        "|" + " --- |" * (4 + len(METRIC_COLUMNS)),
    ]
    for run in order:
        row, rank = run.row(), ranking.rank(run)
        cells = [_cell(row[k], k == "best_val" and rank == 1) for k, _ in METRIC_COLUMNS]
        overrides = markdown_code(" ".join(own[run.name])) if own[run.name] else ""
        lines.append(f"| {rank or ''} | {markdown_text(run.name)} | {overrides} | {run.status} | " + " | ".join(cells) + " |")
    comparison = course_report.comparison_section(order)  # runs of +experiment=report beside the course report's
    if comparison:
        lines += ["", *comparison]
    folds = cross_validation_section(runs, METRIC_COLUMNS)  # runs of +experiment=cv: mean and spread over their folds
    if folds:
        lines += ["", *folds]
    problems = [r for r in runs if r.status != "ok"]
    if problems:
        lines += ["", "## Runs without results", ""]
        lines += [f"- run {markdown_text(r.name)} ({r.status}): {markdown_text(r.error)}" for r in problems]
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
        f"Run {markdown_text(run.name)} ({markdown_code(' '.join(own[run.name])) if own[run.name] else 'no own overrides'}): "
        f"{markdown_text(ranking.monitor)} "
        f"{m['best_checkpoint']['score']:.4f} at its best checkpoint, the {'lowest' if ranking.mode == 'min' else 'highest'} "
        f"of {len(ranking.ranked)} finished run(s).",
        (f"Its test figures, at threshold {m['threshold']:.4f} ({markdown_text(rule)}): {scores}." if m["threshold"] is not None else
         f"Its test figures, {len(m['class_names'])} classes, each image called its most probable (macro averages): {scores}."),
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
            ax.plot(x, values, marker="o", markersize=3, color=colors(i % colors.N), label=f"run {plot_text(run.name)}")
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


REPORT_OUTPUTS = ("report.md", "summary.csv", "figures")


def refuse_outside_writes(sweep_dir: Path) -> None:
    """The report writes only inside the sweep folder: an output that is a link to a folder (a
    `figures/` pointing elsewhere) or a non-file is refused before anything is written. A link named
    report.md or summary.csv is replaced, never written through."""
    from xray_cls.errors import UserInputError

    for name in REPORT_OUTPUTS:
        path = sweep_dir / name
        if name == "figures" and path.is_symlink():
            raise UserInputError(
                f"{path} is a symbolic link (to {one_line(os.readlink(path), 200)}); the sweep report writes only inside "
                f"the sweep folder: remove the link and run it again"
            )
        if path.exists() and not path.is_symlink() and (path.is_dir() != (name == "figures")):
            raise UserInputError(f"{path} is a {'folder' if path.is_dir() else 'file'}, not the report's {name}; move it away")


def write_report(sweep_dir: Path) -> Path:
    """(Re)writes report.md, summary.csv and figures/ of a sweep folder; returns report.md's path."""
    from xray_cls.errors import UserInputError

    if not sweep_dir.is_dir():
        raise UserInputError(f"{sweep_dir} is not a folder; expected a sweep folder such as outputs/multirun/<date>/<time>")
    runs = [read_run(d) for d in find_run_dirs(sweep_dir)]
    if not runs:
        raise UserInputError(f"{sweep_dir} holds no runs; expected Hydra run folders with .hydra/overrides.yaml inside")
    refuse_outside_writes(sweep_dir)
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
    from xray_cls.cli import exit_on_user_error
    from xray_cls.interrupts import interruptible

    parser = argparse.ArgumentParser(prog="python -m xray_cls.sweep_report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. outputs/multirun/<date>/<time>")
    args = parser.parse_args(argv)
    with interruptible(lambda: "the report was not finished (each of its files is whole, old or new); run the command again"):
        print(exit_on_user_error(lambda: write_report(args.sweep_dir)))


if __name__ == "__main__":
    main()
