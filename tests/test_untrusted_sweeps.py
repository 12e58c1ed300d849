"""A sweep folder someone sends you: every file in it is a stranger's, and the report treats it so.

Each test builds its hostile file inside a copy of a real finished run (conftest's `mlp_run`),
then runs the report through its command line, `python -m xray_cls.sweep_report`, in-process.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xray_cls import sweep_report


def make_sweep(tmp_path: Path, run: Path, runs: int = 2) -> Path:
    """A sweep folder of `runs` copies of a finished run, each with Hydra's overrides.yaml."""
    sweep = tmp_path / "SW"
    for job in range(runs):
        shutil.copytree(run, sweep / str(job), ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
        (sweep / str(job) / ".hydra").mkdir(exist_ok=True)
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(f"- model=mlp\n- seed={job}\n")
    return sweep


def report(sweep: Path, capsys: pytest.CaptureFixture) -> tuple[str, list[dict[str, str]], str]:
    """(report.md, summary.csv rows, stderr) of `python -m xray_cls.sweep_report SWEEP`, which must succeed."""
    sweep_report.main([str(sweep)])
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    return (sweep / "report.md").read_text(), rows, capsys.readouterr().err


def test_a_yaml_tag_that_would_run_code_makes_its_run_unreadable(tmp_path: Path, mlp_run: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = make_sweep(tmp_path, mlp_run)
    marker = tmp_path / "ran"
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text(f'- !!python/object/apply:os.system ["touch {marker}"]\n')
    text, rows, _ = report(sweep, capsys)
    assert not marker.exists()
    assert [r["status"] for r in rows] == ["unreadable", "ok"]
    assert "overrides.yaml: holds the YAML tag 'tag:yaml.org,2002:python/object/apply:os.system'" in rows[0]["error"]
    assert "| unreadable |" in text and "| ok |" in text


def test_interpolations_in_received_overrides_are_never_resolved(
    tmp_path: Path, mlp_run: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XRAY_CLS_TEST_SECRET", "s3cr3t-value")
    sweep = make_sweep(tmp_path, mlp_run)
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text(
        '- "tag=${oc.env:XRAY_CLS_TEST_SECRET}"\n- "home=${oc.env:HOME}"\n- "dir=${fresh_dir:/tmp/x}"\n'
    )
    text, rows, _ = report(sweep, capsys)
    summary = (sweep / "summary.csv").read_text()
    for output in (text, summary):
        assert "s3cr3t-value" not in output and os.environ["HOME"] + " " not in output
    assert rows[0]["status"] == "ok"
    assert rows[0]["overrides"] == "tag=${oc.env:XRAY_CLS_TEST_SECRET} home=${oc.env:HOME} dir=${fresh_dir:/tmp/x}"
    assert "${oc.env:XRAY_CLS_TEST_SECRET}" in text


NESTED = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("metrics.json", "{not json", "is not valid JSON"),
        ("metrics.json", "{}", "class_names is not a list"),
        ("metrics.json", NESTED, "nests deeper than 32 levels"),
        ("failed.json", '{"status": "failed"}', "error is not a string"),
        ("curves.csv", "epoch,loss/val\nx,0.5\n", "row 2 holds something other than an epoch number and numbers"),
        ("curves.csv", "epoch,loss/val\n1,notanumber\n", "row 2 holds something other than an epoch number and numbers"),
        ("curves.csv", "step,loss/val\n1,0.5\n", "has no epoch column"),
    ],
    ids=["not-json", "no-fields", "nested", "failed-without-error", "epoch-x", "notanumber", "no-epoch"],
)
def test_malformed_run_files_make_their_run_a_row_naming_the_file(
    tmp_path: Path, mlp_run: Path, capsys: pytest.CaptureFixture, name: str, content: str, reason: str
) -> None:
    sweep = make_sweep(tmp_path, mlp_run)
    if name == "failed.json":
        (sweep / "0" / "metrics.json").unlink()
    (sweep / "0" / name).write_text(content)
    text, rows, _ = report(sweep, capsys)
    assert [r["status"] for r in rows] == ["unreadable", "ok"]
    assert rows[0]["error"].startswith(f"{sweep / '0' / name}: ") and reason in rows[0]["error"]
    assert f"run 0 (unreadable): {sweep}" in text.replace("\\", "")


def test_metrics_that_are_not_numbers_are_refused(tmp_path: Path, mlp_run: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = make_sweep(tmp_path, mlp_run)
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    metrics["test"]["auroc"] = "notanumber"
    (sweep / "0" / "metrics.json").write_text(json.dumps(metrics))
    _, rows, _ = report(sweep, capsys)
    assert rows[0]["status"] == "unreadable" and rows[0]["error"].endswith("metrics.json: test.auroc is not a number")


def test_a_huge_confusion_matrix_is_refused_before_it_is_drawn(tmp_path: Path, mlp_run: Path, capsys: pytest.CaptureFixture) -> None:
    """A 300x300 matrix (275 KB) once cost minutes and gigabytes of drawing: now it is not read."""
    sweep = make_sweep(tmp_path, mlp_run)
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    metrics["class_names"] = [f"c{i}" for i in range(300)]
    metrics["confusion_matrix"]["matrix"] = [[1] * 300 for _ in range(300)]
    (sweep / "0" / "metrics.json").write_text(json.dumps(metrics))
    _, rows, _ = report(sweep, capsys)
    assert rows[0]["status"] == "unreadable" and "class_names is not a list of 2 to 64 names" in rows[0]["error"]


def test_a_yaml_alias_bomb_is_refused_without_expanding(tmp_path: Path, mlp_run: Path) -> None:
    """Six levels of ten aliases (336 bytes) would expand to a million strings: the first alias stops it."""
    sweep = make_sweep(tmp_path, mlp_run)
    lines = ["- &a0 x"] + [f"- &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    bomb = "\n".join(lines) + "\n"
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text(bomb)
    done = subprocess.run([sys.executable, "-m", "xray_cls.sweep_report", str(sweep)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with (sweep / "summary.csv").open() as f:
        row = next(csv.DictReader(f))
    assert row["status"] == "unreadable" and "holds a YAML alias or anchor" in row["error"]


def test_the_report_never_writes_through_a_link_out_of_the_sweep_folder(tmp_path: Path, mlp_run: Path) -> None:
    sweep = make_sweep(tmp_path, mlp_run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "val_loss.png").write_bytes(b"precious")
    (sweep / "figures").symlink_to(elsewhere)
    done = subprocess.run([sys.executable, "-m", "xray_cls.sweep_report", str(sweep)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {sweep / 'figures'} is a symbolic link (to {elsewhere}); the sweep report writes only inside the "
        "sweep folder: remove the link and run it again"
    ]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["val_loss.png"]
    assert (elsewhere / "val_loss.png").read_bytes() == b"precious"
    assert not (sweep / "report.md").exists()

    # A link named like an output file is replaced inside the folder, never written through.
    (sweep / "figures").unlink()
    (sweep / "report.md").symlink_to(elsewhere / "val_loss.png")
    sweep_report.write_report(sweep)
    assert (elsewhere / "val_loss.png").read_bytes() == b"precious"
    assert not (sweep / "report.md").is_symlink() and (sweep / "report.md").read_text().startswith("# Sweep report")


def test_strings_from_the_runs_are_shown_not_rendered(tmp_path: Path, mlp_run: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = make_sweep(tmp_path, mlp_run, runs=3)
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- 'x=![t](http://host/x.png)'\n- 'y=<script>alert(1)</script>'\n- 'z=a`|`b'\n")
    (sweep / "1" / "metrics.json").unlink()
    (sweep / "1" / "failed.json").write_text(json.dumps({"error": "![t](http://host/x.png) <img src=x onerror=alert(1)>\n| a | b |"}))
    (sweep / "2").rename(sweep / "![t](http:x)")
    text, rows, _ = report(sweep, capsys)
    assert "<script>" not in text and "<img" not in text
    images = re.findall(r"(?<!\\)!\[[^\]]*\]\(([^)]*)\)", text)
    assert images and all(target.startswith("figures/") for target in images)  # the report's own figures only
    # The overrides stay in one cell, whatever backticks and bars they hold.
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| val rank"))
    row = next(line for line in lines if line.startswith("| ") and "x=" in line)
    assert "x=\\!\\[t\\](http://host/x.png) y=&lt;script&gt;alert(1)&lt;/script&gt; z=a\\`\\|\\`b" in row
    unescaped_bars = re.compile(r"(?<!\\)\|")
    assert len(unescaped_bars.findall(row)) == len(unescaped_bars.findall(header))
    assert "run 1 (failed): \\!\\[t\\](http://host/x.png) &lt;img src=x onerror=alert(1)&gt; \\| a \\| b \\|" in text
    assert "| \\!\\[t\\](http:x) |" in text
    assert rows[1]["error"].startswith("![t](http://host/x.png)")  # the CSV keeps the text as it was, on one line
