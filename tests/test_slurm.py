"""Sweeps, DDP and preemption on a real SLURM scheduler: a one-node cluster started by
scripts/slurm_cluster.sh (Debian's slurm-wlm and munge, as root), stopped after the tests.

Each sweep runs one config twice; the second run's job is requeued (`scontrol requeue`, what a
preemption does) in its last epoch, and must end as its uninterrupted twin.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xray_cls.data import BUNDLED_NPZ

from test_sweeps import read_summary
from test_train import load_events

pytestmark = pytest.mark.slow  # starts a SLURM cluster and runs sweeps on it

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
# Three epochs, long enough (20 steps; 80 per process under DDP, whose steps are quicker here)
# that the requeue lands in the third; augmentation and dropout make the result depend on the
# random generators being restored.
RUN = ["model=mlp", "trainer.max_epochs=3", "gradcam_samples=0", "bootstrap.resamples=100"]
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]
DDP = ["hydra.launcher.tasks_per_node=2", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
       "trainer.limit_train_batches=80"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A running one-node cluster in a private folder; SLURM_CONF points this process and every
    command and job it starts at it."""
    missing = [c for c in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(c) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not found): apt-get install slurm-wlm munge, as .ci/run does")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root; run the tests as root")
    folder = tmp_path_factory.mktemp("slurm")
    # 4 CPUs on this 2-core machine: both sweeps' jobs (a DDP job takes 2) run at once.
    env = {**os.environ, "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port()), "SLURM_NODE_CPUS": "4"}
    start = subprocess.run([CLUSTER_SCRIPT, "start", folder], env=env, capture_output=True, text=True, timeout=60)
    if start.returncode != 0:
        subprocess.run([CLUSTER_SCRIPT, "stop", folder], env=env, capture_output=True, timeout=120)
        pytest.fail(f"the SLURM cluster did not start: {start.stdout}{start.stderr}")
    again = subprocess.run([CLUSTER_SCRIPT, "start", folder], env=env, capture_output=True, text=True, timeout=60)
    assert "already running" in again.stdout  # idempotent
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    yield folder
    stop = subprocess.run([CLUSTER_SCRIPT, "stop", folder], env=env, capture_output=True, text=True, timeout=120)
    if previous is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = previous
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = subprocess.run([CLUSTER_SCRIPT, "status", folder], env=env, capture_output=True, text=True, timeout=30)
    assert status.returncode == 3, status.stdout


def start_sweep(sweep_dir: Path, *args: str) -> subprocess.Popen:
    """`python -m xray_cls -m ...` on the cluster: the jobs inherit this environment (sbatch --export=ALL)."""
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "xray_cls", "-m", *args, *LAUNCHER, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.Popen(command, cwd=sweep_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def requeue_in_last_epoch(sweeps: dict[Path, subprocess.Popen], run: str) -> None:
    """`scontrol requeue` of the run's job in each sweep once its second epoch's last.ckpt is written."""
    deadline = time.monotonic() + 300
    saves = {sweep_dir: [] for sweep_dir in sweeps}  # last.ckpt's modification times seen
    while saves:
        for sweep_dir, seen in list(saves.items()):
            process = sweeps[sweep_dir]
            assert process.poll() is None, process.communicate()[0][-3000:]
            checkpoint = sweep_dir / run / "checkpoints" / "last.ckpt"
            mtime = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
            if mtime is not None and mtime not in seen:
                seen.append(mtime)
            if len(seen) == 2:
                requeue(sweep_dir, run, deadline)
                del saves[sweep_dir]
        assert time.monotonic() < deadline, f"no second checkpoint after 300 s: {saves}"
        time.sleep(0.05)


def requeue(sweep_dir: Path, run: str, deadline: float) -> None:
    (array_id,) = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
    job = f"{array_id}_{run}"  # map_array: the sweep's run N is task N of the job array
    subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=30)
    # SLURM holds a requeued job for 2 minutes before it may start again; a test need not wait.
    while "PENDING" not in subprocess.run(["squeue", "-h", "-o", "%T", "-j", job], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, f"job {job} not pending again after its requeue"
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, capture_output=True, timeout=30)


def finish(sweep: subprocess.Popen, timeout: float = 420) -> str:
    output, _ = sweep.communicate(timeout=timeout)
    assert sweep.returncode == 0, output[-3000:]
    return output


def assert_same_test_figures(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["confusion_matrix"] == uninterrupted["confusion_matrix"]
    assert resumed["test"] == uninterrupted["test"]  # exact: same weights, same predictions
    assert resumed["best_checkpoint"]["score"] == uninterrupted["best_checkpoint"]["score"]
    assert resumed["epochs"] == uninterrupted["epochs"]


@pytest.fixture(scope="module")
def sweeps(slurm_cluster: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Two sweeps on the cluster at once, each running one config twice, run 1 requeued mid-training:
    - single: one process per job, plus a run that fails on a bad override;
    - ddp: DDP over two SLURM tasks per job, on an odd test set (a sampler that pads the two
      shares with a repeat would count 624 images, not 623)."""
    folder = tmp_path_factory.mktemp("slurm_sweeps")
    arrays = dict(np.load(BUNDLED_NPZ))
    arrays["test_images"], arrays["test_labels"] = arrays["test_images"][:623], arrays["test_labels"][:623]
    np.savez(folder / "odd_test.npz", **arrays)
    runs = {
        "single": start_sweep(folder / "single", *RUN, "trainer.limit_train_batches=20", "data.aug=mild,mild,bogus"),  # runs 0, 1 and 2
        "ddp": start_sweep(folder / "ddp", *RUN, *DDP, "data.aug=mild", f"data.path={folder / 'odd_test.npz'}", "seed=5,5"),
    }
    requeue_in_last_epoch({folder / name: process for name, process in runs.items()}, run="1")
    return {name: (folder / name, finish(process)) for name, process in runs.items()}


@pytest.fixture(scope="module")
def sweep(sweeps: dict[str, tuple[Path, str]]) -> tuple[Path, str]:
    return sweeps["single"]


@pytest.fixture(scope="module")
def ddp_sweep(sweeps: dict[str, tuple[Path, str]]) -> tuple[Path, Path]:
    sweep_dir = sweeps["ddp"][0]
    return sweep_dir, sweep_dir.parent / "odd_test.npz"


def test_each_run_of_a_sweep_is_a_job_and_the_report_has_every_row(sweep: tuple[Path, str]) -> None:
    sweep_dir, _ = sweep
    rows = read_summary(sweep_dir)
    assert [(r["run"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok"), ("2", "failed")]
    assert "data.aug='bogus'" in rows[2]["error"]
    jobs = [json.loads((sweep_dir / run / "metrics.json").read_text())["slurm"] for run in ("0", "1")]
    assert len({job["job_id"] for job in jobs}) == 2  # one job per run
    array_id = jobs[0]["array_job"].split("_")[0]
    assert [job["array_job"] for job in jobs] == [f"{array_id}_0", f"{array_id}_1"]
    assert all(job["partition"] == "debug" and job["tasks"] == 1 for job in jobs)
    report = (sweep_dir / "report.md").read_text()
    assert "3 runs: 2 finished, 1 failed" in report
    assert report.count("| ok |") == 2


def test_a_requeued_job_continues_its_run_and_ends_as_the_uninterrupted_one(sweep: tuple[Path, str]) -> None:
    sweep_dir, output = sweep
    uninterrupted = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    resumed = json.loads((sweep_dir / "1" / "metrics.json").read_text())
    assert uninterrupted["slurm"]["restarts"] == 0 and uninterrupted["resumed_from"] is None
    assert resumed["slurm"]["restarts"] == 1
    assert resumed["resumed_from"] == str(sweep_dir / "1" / "checkpoints" / "last.ckpt")
    assert_same_test_figures(resumed, uninterrupted)
    # train_seconds counts the epochs before the requeue too, as the resumed run's own record says
    assert resumed["train_seconds"] > resumed["train_seconds_before_resume"] > 0
    assert uninterrupted["train_seconds_before_resume"] == 0
    # One curve in the run's own TensorBoard folder, one point per epoch, none repeated.
    steps = [event.step for event in load_events(sweep_dir / "1").Scalars("loss/val")]
    assert len(steps) == len(set(steps)) == 3
    log = (sweep_dir / "1" / "train.log").read_text()
    assert "SIGTERM: stopping after this batch, with a checkpoint" in log and "SLURM restarted this job (restart 1)" in log
    # Nothing stray: the run continued in its own folder, and no other folder appeared.
    assert sorted(p.name for p in sweep_dir.parent.iterdir()) == ["ddp", "odd_test.npz", "single"]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1", "2", "figures"]
    # One explained sacct warning instead of one per poll.
    assert output.count("sacct") == 1 and "keeps no accounting database" in output


def test_a_requeued_job_never_takes_over_a_finished_run_or_another_config(sweep: tuple[Path, str], tmp_path: Path) -> None:
    from xray_cls.training.resume import requeued_checkpoint

    from conftest import compose_config

    sweep_dir, _ = sweep
    run = [*RUN, "trainer.limit_train_batches=20", "data.aug=mild"]
    copy = tmp_path / "unfinished"
    shutil.copytree(sweep_dir / "1", copy)
    (copy / "metrics.json").unlink()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_RESTART_COUNT", "1")
        assert requeued_checkpoint(compose_config(sweep_dir / "0", run)) is None  # finished: it has metrics.json
        assert requeued_checkpoint(compose_config(copy, [*run, "model.dropout=0.25"])) is None
        assert requeued_checkpoint(compose_config(copy, run)) == copy / "checkpoints" / "last.ckpt"
        patch.delenv("SLURM_RESTART_COUNT")
        assert requeued_checkpoint(compose_config(copy, run)) is None  # not a restarted job


@pytest.mark.filterwarnings("ignore:The `srun` command is available")
def test_ddp_over_two_slurm_tasks_counts_the_test_set_once(ddp_sweep: tuple[Path, Path]) -> None:
    import lightning as L

    from xray_cls.data import PneumoniaMNISTDataModule
    from xray_cls.models.classifier import XrayClassifier

    sweep_dir, npz = ddp_sweep
    metrics = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    assert metrics["slurm"]["tasks"] == 2
    cells = metrics["confusion_matrix"]
    assert cells["tn"] + cells["fp"] + cells["fn"] + cells["tp"] == 623
    assert cells["fn"] + cells["tp"] == int(np.load(npz)["test_labels"][:623].sum())
    # The same checkpoint evaluated by a single process gives the same matrix and scores.
    module = XrayClassifier.load_from_checkpoint(sweep_dir / "0" / metrics["best_checkpoint"]["path"], map_location="cpu")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.test(module, datamodule=PneumoniaMNISTDataModule(path=str(npz)), verbose=False)
    assert module.test_results["confusion_matrix"] == cells["matrix"]
    for key, value in module.test_results["scores"].items():
        assert value == pytest.approx(metrics["test"][key], abs=1e-6), key


def test_a_requeued_ddp_job_resumes_exactly(ddp_sweep: tuple[Path, Path]) -> None:
    import torch

    sweep_dir, _ = ddp_sweep
    uninterrupted = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    resumed = json.loads((sweep_dir / "1" / "metrics.json").read_text())
    assert resumed["slurm"]["restarts"] == 1 and resumed["slurm"]["tasks"] == 2
    assert resumed["resumed_from"] == str(sweep_dir / "1" / "checkpoints" / "last.ckpt")
    assert_same_test_figures(resumed, uninterrupted)
    # Both processes' random generators are in the checkpoint, each its own.
    checkpoint = torch.load(sweep_dir / "1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(checkpoint["rng_states_per_rank"]) == 2
