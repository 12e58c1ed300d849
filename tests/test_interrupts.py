"""Ctrl+C (SIGINT) and SIGTERM in each phase of a run: fitting, the val choices, the test and
writing the report. The signal is real, sent by the run to itself at a chosen point
(case_entries.interrupted_run); the run must stop with one line saying how to resume, leave no
file half-written, and its resume must give exactly the uninterrupted run's result."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from fuzzing import CaseServer

pytestmark = pytest.mark.slow

# Augmentation and dropout draw random numbers: an exact resume needs the generators restored.
RUN = ["model=mlp", "debug=fast", "trainer.max_epochs=2", "data.aug=strong", "gradcam_samples=2", "bootstrap.resamples=20"]
PHASES = ["fit", "last validation", "choices", "test", "report"]


def finished(case_server: CaseServer, case: Path, run: list[str]) -> dict:
    outcome = case_server.run("xray_cls.train", [*run, f"hydra.run.dir={case / 'run'}"], case, timeout=300)
    assert outcome.exit == 0, outcome.describe()
    return json.loads((case / "run" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(case_server: CaseServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return finished(case_server, tmp_path_factory.mktemp("uninterrupted"), RUN)


def assert_whole(run_dir: Path) -> None:
    """Every file the run left parses as what it is; no temporary file is left behind."""
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    for path in run_dir.rglob("*.json"):
        json.loads(path.read_text())
    for path in run_dir.rglob("*.png"):
        with Image.open(path) as image:
            image.verify()
    for path in run_dir.rglob("*.csv"):
        with path.open(newline="") as f:
            assert list(csv.reader(f))
    for path in run_dir.rglob("*.ckpt"):
        torch.load(path, weights_only=True)
    assert isinstance(yaml.safe_load((run_dir / "config.yaml").read_text()), dict)


def stop_and_resume(case_server: CaseServer, tmp_path: Path, run: list[str], phase: str, signum: int) -> dict:
    """The run stopped by `signum` in `phase`: one line saying how to resume, every file whole;
    then resumed as that line says. Returns the resumed run's metrics.json."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    stopped = case_server.run("case_entries:interrupted_run", [*run, f"hydra.run.dir={run_dir}"], tmp_path, timeout=300,
                              env={"XRAY_CLS_TEST_PHASE": phase, "XRAY_CLS_TEST_SIGNAL": str(int(signum))})
    assert stopped.exit == 128 + signum, stopped.describe()
    assert "Traceback" not in stopped.stderr, stopped.describe()
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith(f"interrupted: {signal.Signals(signum).name} received; "), line
    assert f"resume with the same overrides and ckpt_path={last}" in line, line
    assert not (run_dir / "metrics.json").exists()
    assert_whole(run_dir)

    resumed = case_server.run("xray_cls.train", [*run, f"ckpt_path={last}"], tmp_path, timeout=300)
    assert resumed.exit == 0, resumed.describe()
    assert_whole(run_dir)
    return json.loads((run_dir / "metrics.json").read_text())


def assert_same_result(metrics: dict, uninterrupted: dict) -> None:
    for key in ("confusion_matrix", "test", "test_ci", "threshold", "epochs"):
        assert metrics[key] == uninterrupted[key], key
    assert metrics["best_checkpoint"]["score"] == uninterrupted["best_checkpoint"]["score"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", PHASES)
def test_a_run_stopped_in_any_phase_says_how_to_resume_and_resumes_to_the_same_result(
    case_server: CaseServer, uninterrupted: dict, tmp_path: Path, phase: str, signum: int
) -> None:
    assert_same_result(stop_and_resume(case_server, tmp_path, RUN, phase, signum), uninterrupted)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_run_with_loader_workers_stops_with_them_and_resumes(case_server: CaseServer, kermany_root: Path, tmp_path: Path,
                                                              signum: int) -> None:
    """The signal reaches the DataLoader workers too, as a terminal's Ctrl+C does: they leave it to the run."""
    run = ["model=mlp", "debug=fast", "trainer.max_epochs=2", "data=folder", f"data.root={kermany_root}", "data.image_size=16",
           "data.num_workers=2", "data.min_val_images=4", "data.batch_size=8", "gradcam_samples=0", "bootstrap.resamples=20"]
    expected = finished(case_server, tmp_path / "uninterrupted", run)
    assert_same_result(stop_and_resume(case_server, tmp_path / "stopped", run, "fit", signum), expected)
