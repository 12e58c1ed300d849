"""Runs that a refused command, a second command, a kill or a full disk could destroy, through the real CLI.

A refused command writes nothing (not even Hydra's .hydra/); two commands cannot share a folder;
a checkpoint is never left half-written, wherever $TMPDIR is; a full disk is one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from xray_cls.models.checkpoints import read_checkpoint

from conftest import SHORT_RUN, run_cli

pytestmark = pytest.mark.slow  # kills runs, fills disks and races commands through the CLI

MLP = ["model=mlp", "gradcam_samples=0", "bootstrap.resamples=10"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short run made through the CLI, so that it has Hydra's .hydra/ record."""
    folder = tmp_path_factory.mktemp("runs")
    run_dir = folder / "run"
    done = run_cli([*MLP, *SHORT_RUN, f"hydra.run.dir={run_dir}"], cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_a_refused_run_leaves_the_finished_run_as_it_was(finished_run: Path, tmp_path: Path) -> None:
    before = snapshot(finished_run)
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "metrics.json"} <= before.keys()
    done = run_cli(["model=cnn", "seed=3", f"hydra.run.dir={finished_run}"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: the run folder {finished_run} already holds a run (metrics.json); choose a new hydra.run.dir (nothing was "
        "written), or resume an interrupted run with ckpt_path=<run>/checkpoints/last.ckpt"
    ]
    assert snapshot(finished_run) == before  # .hydra/ too: the sweep report and resume read it


def test_a_refused_prediction_leaves_the_earlier_one_as_it_was(finished_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("L", (40, 40), 100).save(tmp_path / "scan.png")
    args = [f"ckpt={finished_run / 'checkpoints' / 'best.ckpt'}", f"input={tmp_path / 'scan.png'}", f"hydra.run.dir={tmp_path / 'out'}"]
    assert run_cli(args, cwd=tmp_path, module="xray_cls.predict").returncode == 0
    before = snapshot(tmp_path / "out")
    again = run_cli([*args, "threshold=0.1"], cwd=tmp_path, module="xray_cls.predict")
    assert again.returncode == 2
    assert again.stderr.strip() == (
        f"error: the output folder {tmp_path / 'out'} already holds predictions (predictions.csv); choose a new hydra.run.dir "
        "(nothing was written)"
    )
    assert snapshot(tmp_path / "out") == before


def test_two_runs_started_into_one_folder_cannot_both_go_on(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen([sys.executable, "-m", "xray_cls", *MLP, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "train.log").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.1)
        second = run_cli(["model=cnn", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        output, errors = first.communicate(timeout=600)
    finally:
        first.kill()
    assert second.returncode == 2
    assert second.stderr.strip() == f"error: {run_dir} is in use by another command (it holds the folder's lock); choose another folder"
    assert first.returncode == 0, errors[-3000:]
    assert (run_dir / ".hydra" / "overrides.yaml").read_text().startswith("- model=mlp")  # the first run's record


def can_mount_tmpfs(tmp_path: Path) -> str | None:
    """Why a small tmpfs cannot be mounted here, or None when it can."""
    if os.geteuid() != 0:
        return "mounting a size-limited tmpfs needs root"
    probe = tmp_path / "probe"
    probe.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True, text=True)
    if done.returncode != 0:
        return f"mount -t tmpfs failed: {done.stderr.strip()}"
    subprocess.run(["umount", str(probe)], check=True)
    return None


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Path:
    reason = can_mount_tmpfs(tmp_path)
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    return tmp_path


def test_checkpoints_never_pass_through_tmpdir(tmpfs: Path) -> None:
    """Lightning staged every checkpoint in $TMPDIR: a 1 MB one failed the first checkpoint (about 3 MB)."""
    with small_disk(tmpfs / "tmp", "1m") as small_tmp:
        env_tmp = {"TMPDIR": str(small_tmp)}
        run_dir = tmpfs / "run"
        done = subprocess.run([sys.executable, "-m", "xray_cls", *MLP, *SHORT_RUN, f"hydra.run.dir={run_dir}"], cwd=tmpfs,
                              env={**os.environ, "PYTHONWARNINGS": "ignore", **env_tmp}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert list(small_tmp.iterdir()) == []
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_size > 2**20


def test_a_full_run_folder_disk_is_one_line_and_keeps_the_earlier_checkpoints(tmpfs: Path) -> None:
    with small_disk(tmpfs / "disk", "8m") as disk:
        run_dir = disk / "run"
        done = run_cli([*MLP, "trainer.max_epochs=3", "trainer.limit_train_batches=5", f"hydra.run.dir={run_dir}"], cwd=tmpfs)
        assert done.returncode == 2, done.stderr[-3000:]
        last_line = done.stderr.strip().splitlines()[-1]
        assert last_line.startswith(f"error: the disk of {run_dir / 'checkpoints'} is full: ")
        assert "(No space left on device); the checkpoints written before it are intact" in last_line
        assert "Traceback" not in done.stderr
        for name in ("best.ckpt", "last.ckpt"):  # the first epoch's, whole
            assert read_checkpoint(run_dir / "checkpoints" / name)["epoch"] == 0
        assert not list((run_dir / "checkpoints").glob(".*.tmp"))


# Runs xray_cls with checkpoint writes slowed down on the Nth write: half the bytes, a marker file,
# then a long sleep, during which the test kills the process.
SLOW_WRITER = """
import runpy, sys, time
from pathlib import Path
import xray_cls.core.checkpoint_files as checkpoint
slow_call, marker = int(sys.argv[1]), Path(sys.argv[2])
calls, write = [0], checkpoint.write_bytes
def slow(path, data):
    calls[0] += 1
    if calls[0] == slow_call:
        with path.open("wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            marker.touch()
            time.sleep(600)
    write(path, data)
checkpoint.write_bytes = slow
sys.argv = ["xray_cls", *sys.argv[3:]]
runpy.run_module("xray_cls", run_name="__main__")
"""


def test_a_kill_during_a_checkpoint_write_leaves_a_checkpoint_to_resume_from(tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "writing"
    args = [*MLP, "trainer.max_epochs=3", "trainer.limit_train_batches=5", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # Writes 1 and 2 are the first epoch's best and last checkpoints; write 3 is the second epoch's first.
    run = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, "3", str(marker), *args], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert run.poll() is None, run.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the third checkpoint write never started"
            time.sleep(0.05)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=60)
    finally:
        run.kill()
    checkpoints = run_dir / "checkpoints"
    assert len(list(checkpoints.glob(".*.ckpt.*.tmp"))) == 1  # the torn write, beside the intact files
    assert read_checkpoint(checkpoints / "last.ckpt")["epoch"] == 0
    resumed = run_cli([*args[:-1], f"ckpt_path={checkpoints / 'last.ckpt'}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "metrics.json").is_file()
    assert read_checkpoint(checkpoints / "last.ckpt")["epoch"] == 2
    assert not list(checkpoints.glob(".*.tmp"))
