"""The report of a sweep: `python -m xray_cls.sweep_report SWEEP_DIR`, also written at the end of every multirun.

It reads only what the runs wrote (`.hydra/overrides.yaml`, `metrics.json` or `failed.json`,
`curves.csv`), whichever logger they used, so a copied sweep folder can be reported again, and writes `report.md`,
`summary.csv` and `figures/` into the sweep folder. The same runs give the same files.

A sweep folder may come from someone else, so its files are data from a stranger
(`xray_cls.core.untrusted`): bounded in size and depth, YAML without tags or aliases, nothing resolved
or instantiated, each field checked. A run whose files break a rule is a row marked unreadable,
naming the file and why, and the report goes on. Strings from the runs are escaped in report.md,
and nothing is written outside the sweep folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from xray_cls.core.files import path_text, write_csv, write_text
from xray_cls.core.untrusted import markdown_code, markdown_text, one_line
from xray_cls.reports import course_report
from xray_cls.reports.cross_validation import cross_validation_section
from xray_cls.reports.sweep_figures import write_figures
from xray_cls.reports.sweep_runs import METRIC_COLUMNS, TEST_SCORES, Run, find_run_dirs, read_run

log = logging.getLogger(__name__)


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


REPORT_OUTPUTS = ("report.md", "summary.csv", "figures")


def refuse_outside_writes(sweep_dir: Path) -> None:
    """The report writes only inside the sweep folder: an output that is a link to a folder (a
    `figures/` pointing elsewhere) or a non-file is refused before anything is written. A link named
    report.md or summary.csv is replaced, never written through."""
    from xray_cls.core.errors import UserInputError

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
    from xray_cls.core.errors import UserInputError

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
