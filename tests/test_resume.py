"""Interrupted runs resume (`ckpt_path=`) to the result of an uninterrupted run; runs are never overwritten."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xray_cls.core.errors import UserInputError
from xray_cls.core.untrusted import read_epoch_curves
from xray_cls.data import BUNDLED_NPZ, read_npz
from xray_cls.runtime.configs import fresh_dir
from xray_cls.train import train

from conftest import SHORT_RUN, compose_config, run_cli
from test_train import load_events

pytestmark = pytest.mark.slow  # interrupts, kills and resumes multi-epoch runs

# Long enough epochs (about 150 steps) that a signal sent after the first one lands mid-epoch;
# augmentation and dropout make the result depend on the random generators being restored.
RUN = ["model=mlp", "data.aug=strong", "trainer.max_epochs=3", "gradcam_samples=0", "bootstrap.resamples=100"]


def start_run(run_dir: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "xray_cls", *RUN, f"hydra.run.dir={run_dir}"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_first_epoch(process: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "last.ckpt").exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli([*RUN, f"hydra.run.dir={cwd / 'run'}"], cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return cwd / "run"


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run: Path) -> dict:
    return json.loads((uninterrupted_run / "metrics.json").read_text())


def assert_same_result(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["confusion_matrix"] == uninterrupted["confusion_matrix"]
    assert resumed["test"] == uninterrupted["test"]  # exact: same weights, same predictions
    assert resumed["best_checkpoint"]["score"] == uninterrupted["best_checkpoint"]["score"]
    assert resumed["epochs"] == uninterrupted["epochs"]


def test_ctrl_c_checkpoints_mid_epoch_and_resumes_exactly(uninterrupted: dict, uninterrupted_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = start_run(run_dir, tmp_path)
    wait_for_first_epoch(process, run_dir)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"resume with the same overrides and ckpt_path={last}" in stderr
    assert "Traceback" not in stderr
    checkpoint = torch.load(last, weights_only=True)
    steps_per_epoch = math.ceil(len(read_npz(BUNDLED_NPZ)["train"]) / 32)  # batch size 32
    assert checkpoint["global_step"] % steps_per_epoch != 0, "the checkpoint should be mid-epoch"
    assert not (run_dir / "metrics.json").exists()

    result = run_cli([*RUN, f"ckpt_path={last}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["resumed_from"] == str(last)
    assert_same_result(resumed, uninterrupted)
    # One curve per metric in the run's own TensorBoard folder, one point per epoch, no repeats.
    steps = [event.step for event in load_events(run_dir).Scalars("loss/val")]
    assert len(steps) == len(set(steps)) == uninterrupted["epochs"]
    # curves.csv, which the sweep report reads, is the uninterrupted run's, epoch for epoch; only the
    # train loss and accuracy of the interrupted epoch cover just the batches trained after the resume.
    resumed_curves = read_epoch_curves(run_dir / "curves.csv")
    expected = read_epoch_curves(uninterrupted_run / "curves.csv")
    interrupted_epoch = checkpoint["global_step"] // steps_per_epoch + 1
    assert sorted(resumed_curves) == sorted(expected) == list(range(1, uninterrupted["epochs"] + 1))
    for epoch, row in expected.items():
        same = row if epoch != interrupted_epoch else {k: v for k, v in row.items() if k.endswith("/val")}
        assert {k: resumed_curves[epoch][k] for k in same} == same, epoch


def test_killed_run_resumes_from_its_last_epoch(uninterrupted: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = start_run(run_dir, tmp_path)
    wait_for_first_epoch(process, run_dir)
    process.kill()  # SIGKILL: no chance to save anything
    process.communicate(timeout=60)
    last = run_dir / "checkpoints" / "last.ckpt"

    # Resuming with another network is refused, naming both, before anything is written.
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    wrong = run_cli([*RUN, "model=cnn", f"ckpt_path={last}"], cwd=tmp_path)
    assert wrong.returncode == 2
    assert "was trained with model MLP but this run is configured with CNN" in wrong.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before

    result = run_cli([*RUN, f"ckpt_path={last}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_result(json.loads((run_dir / "metrics.json").read_text()), uninterrupted)

    again = run_cli([*RUN, f"ckpt_path={last}"], cwd=tmp_path)  # the run has finished now
    assert again.returncode == 2
    assert f"the run {run_dir} has already finished" in again.stderr


def test_a_finished_run_folder_is_never_reused(mlp_run: Path, tmp_path: Path) -> None:
    before = (mlp_run / "metrics.json").read_bytes()
    result = run_cli(["model=mlp", f"hydra.run.dir={mlp_run}"], cwd=tmp_path)
    assert result.returncode == 2
    assert f"the run folder {mlp_run} already holds a run" in result.stderr
    assert (mlp_run / "metrics.json").read_bytes() == before


def test_run_folders_started_in_the_same_second_are_distinct(tmp_path: Path) -> None:
    base = tmp_path / "outputs" / "12-00-00"
    base.mkdir(parents=True)  # another run's folder
    assert fresh_dir(str(base)) == f"{base}_1"
    assert fresh_dir(str(base)) == f"{base}_1"  # the same answer within one process
    assert Path(f"{base}_1").is_dir()


def interrupted_run(run_dir: Path) -> Path:
    """A short run's folder without its metrics.json, as if it had been stopped: returns its last.ckpt."""
    train(compose_config(run_dir, [*SHORT_RESUMABLE]))
    (run_dir / "metrics.json").unlink()
    return run_dir / "checkpoints" / "last.ckpt"


SHORT_RESUMABLE = ["model=mlp", *SHORT_RUN, "gradcam_samples=0", "bootstrap.resamples=10"]


def test_resume_refuses_a_crafted_network_and_writes_nothing(tmp_path: Path) -> None:
    from test_checkpoint import writes  # a payload that writes its marker file when instantiated

    last = interrupted_run(tmp_path / "run")
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["hyper_parameters"]["net"]["dropout"] = writes(tmp_path / "pwned")
    torch.save(checkpoint, last)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    with pytest.raises(UserInputError, match="is not an xray_cls checkpoint that can be trusted: net.dropout"):
        train(compose_config(tmp_path / "unused", [*SHORT_RESUMABLE, f"ckpt_path={last}"]))
    assert not (tmp_path / "pwned").exists()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


def test_resume_builds_the_optimizer_of_its_config_never_the_checkpoints(tmp_path: Path) -> None:
    from test_checkpoint import writes

    last = interrupted_run(tmp_path / "run")
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["hyper_parameters"]["optimizer"] = writes(tmp_path / "pwned")
    checkpoint["hyper_parameters"]["scheduler"] = writes(tmp_path / "pwned")
    torch.save(checkpoint, last)
    metrics = train(compose_config(tmp_path / "unused", [*SHORT_RESUMABLE, f"ckpt_path={last}"]))
    assert metrics["resumed_from"] == str(last) and (tmp_path / "run" / "metrics.json").is_file()
    assert not (tmp_path / "pwned").exists()


def checkpoint_callback_state(checkpoint: dict) -> dict:
    return next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint"))


def test_a_moved_run_folder_resumes_from_its_own_checkpoints(tmp_path: Path) -> None:
    """Lightning restores absolute paths: the old folder's best.ckpt would be tested, or be missing."""
    last = interrupted_run(tmp_path / "old")
    shutil.move(tmp_path / "old", tmp_path / "new")
    state = checkpoint_callback_state(torch.load(tmp_path / "new" / "checkpoints" / "last.ckpt", weights_only=True))
    assert state["best_model_path"] == str(last.parent / "best.ckpt")  # the old place, which is gone
    metrics = train(compose_config(tmp_path / "unused", [*SHORT_RESUMABLE, f"ckpt_path={tmp_path / 'new' / last.relative_to(tmp_path / 'old')}"]))
    assert metrics["best_checkpoint"]["path"] == "checkpoints/best.ckpt"
    assert metrics["best_checkpoint"]["score"] == pytest.approx(float(state["best_model_score"]))
    assert (tmp_path / "new" / "metrics.json").is_file() and not (tmp_path / "old").exists()


def test_a_checkpoint_naming_files_outside_its_run_is_refused(tmp_path: Path) -> None:
    """ModelCheckpoint deletes a superseded best or last file by the path its state names."""
    last = interrupted_run(tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    checkpoint = torch.load(last, weights_only=True)
    state = checkpoint_callback_state(checkpoint)
    state["best_model_path"] = str(victim)
    state["best_k_models"] = {str(victim): state["best_model_score"]}
    torch.save(checkpoint, last)
    with pytest.raises(UserInputError, match="victim.txt' as one of its run's checkpoints; expected a .ckpt file name"):
        train(compose_config(tmp_path / "unused", [*SHORT_RESUMABLE, "trainer.max_epochs=3", f"ckpt_path={last}"]))
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize(("part", "change", "expected"), [
    ("version", lambda c: c.pop("pytorch-lightning_version"), "it records no Lightning version"),
    ("optimizer", lambda c: [s.pop("step") for s in c["optimizer_states"][0]["state"].values()],
     "optimizer_states does not work with this run's optimizer (KeyError"),
    ("optimizer shape", lambda c: c["optimizer_states"][0]["state"][0].update(exp_avg=torch.zeros(3)),
     "optimizer_states does not work with this run's optimizer (RuntimeError"),
    ("loops", lambda c: c["loops"]["fit_loop"].update({"epoch_progress": {"total": "x"}}), "loops.fit_loop.epoch_progress.total is 'x'"),
    ("callback", lambda c: c["callbacks"].update({"ResumableTraining": {"train_seconds": [1, 2]}}),
     "callbacks[ResumableTraining].train_seconds is a list of 2, not a number"),
    ("random states", lambda c: c["rng_states"].update(torch=torch.zeros(3)), "rng_states.torch is not a state"),
    ("weights", lambda c: c["state_dict"].update({"extra.weight": torch.zeros(1)}), "its state_dict differs from this run's module at extra"),
])
def test_a_training_state_lightning_would_trip_on_is_refused_before_it_restores(tmp_path: Path, part: str, change, expected: str) -> None:
    """Found by the fuzzer: Lightning's restore ended in KeyError and RuntimeError tracebacks."""
    last = interrupted_run(tmp_path / "run")
    checkpoint = torch.load(last, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, last)
    with pytest.raises(UserInputError, match=re.escape(f"ckpt_path={last} cannot be resumed: {expected}")):
        train(compose_config(tmp_path / "unused", [*SHORT_RESUMABLE, f"ckpt_path={last}"]))
