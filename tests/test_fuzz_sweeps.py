"""Fuzzing the sweep report (`python -m xray_cls.sweep_report SWEEP`) with a sweep folder someone
sent: one file of one run (its overrides.yaml, metrics.json, failed.json or curves.csv) mutated as
bytes, as text, or value by value. The report must still be written, every run in it, the damaged
one marked unreadable, or the command must refuse the folder in one line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import (
    HOSTILE_VALUES,
    CaseServer,
    assert_handled,
    assert_writes_only_in,
    case_folders,
    changed_at,
    fuzz_cases,
    fuzz_settings,
    leaf_paths,
    mutate,
    mutations,
    snapshot,
    text_layout,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

FILES = [".hydra/overrides.yaml", "metrics.json", "failed.json", "curves.csv"]


@pytest.fixture(scope="module")
def sweep(mlp_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three runs: two finished (copies of conftest's short run, other overrides), one failed."""
    run = mlp_run
    sweep = tmp_path_factory.mktemp("sweep") / "SW"
    for job in range(2):
        shutil.copytree(run, sweep / str(job), ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
        (sweep / str(job) / ".hydra").mkdir(exist_ok=True)
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(f"- model=mlp\n- seed={job}\n")
    failed = sweep / "2"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text("- model=mlp\n- optimizer.lr=100\n")
    (failed / "failed.json").write_text(json.dumps({"status": "failed", "error": "training loss is nan in epoch 0"}) + "\n")
    return sweep


def check_report(sweep: Path) -> None:
    """report.md and summary.csv, one row per run, each run's status one the report knows."""
    with (sweep / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["0", "1", "2"]
    assert all(r["status"] in ("ok", "failed", "incomplete", "unreadable") for r in rows)
    assert rows[1]["status"] == "ok"  # the run no mutation touched
    assert (sweep / "report.md").read_text().startswith("# Sweep report")


def test_mutated_sweep_folders_are_reported_or_refused_in_one_line(case_server: CaseServer, sweep: Path, tmp_path: Path, pytestconfig: pytest.Config) -> None:
    folders = case_folders(tmp_path)
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    metric_paths = leaf_paths(metrics)

    @fuzz_settings(fuzz_cases(pytestconfig, 30))
    @given(data=st.data())
    def one_case(data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(FILES), label="file")
        job = "2" if name == "failed.json" else "0"
        case = next(folders)
        copy = case / "SW"
        shutil.copytree(sweep, copy)
        target = copy / job / name
        original = target.read_bytes()
        if name == "metrics.json" and data.draw(st.booleans(), label="a value"):
            path = data.draw(st.sampled_from(metric_paths), label="path")
            delete = data.draw(st.booleans(), label="removed")
            value = None if delete else data.draw(st.sampled_from(HOSTILE_VALUES), label="value")
            content = json.dumps(changed_at(metrics, path, value, delete)).encode()
        else:
            content = mutate(original, data.draw(mutations(original, text_layout(original)), label="mutations"))
        target.write_bytes(content)
        before = snapshot(case)
        outcome = case_server.run("xray_cls.sweep_report", [str(copy)], case)
        written_there = [copy / "report.md", copy / "summary.csv", copy / "figures"]
        assert_writes_only_in(before, snapshot(case), case, *written_there)
        if assert_handled(outcome):
            check_report(copy)

    one_case()
