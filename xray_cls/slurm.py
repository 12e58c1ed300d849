"""SLURM: the job a run belongs to, and how a sweep on SLURM (`hydra/launcher=slurm`) polls its jobs.

The launcher is hydra-submitit-launcher's. Through it, submitit learns the state of the jobs
from `sacct`, which needs the cluster's accounting database. Clusters without one (many small
ones) answer every poll with an error, which submitit prints as a warning every few seconds, and
a job that dies without a result would never be seen to end. Here a failing `sacct` is explained
once, and the states are read from `squeue` instead, which every cluster has.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def slurm_job() -> dict[str, Any] | None:
    """The SLURM job this process runs in (recorded in metrics.json), or None outside SLURM."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    env = os.environ.get
    return {
        "job_id": env("SLURM_JOB_ID"),
        "array_job": f"{env('SLURM_ARRAY_JOB_ID')}_{env('SLURM_ARRAY_TASK_ID')}" if env("SLURM_ARRAY_JOB_ID") else None,
        "restarts": int(env("SLURM_RESTART_COUNT") or 0),
        "nodes": env("SLURM_JOB_NODELIST"),
        "tasks": int(env("SLURM_NTASKS") or 1),
        "partition": env("SLURM_JOB_PARTITION"),
    }


def squeue_watcher() -> Any:
    """submitit's job-state poller (SlurmInfoWatcher), reading `squeue` once `sacct` has failed.
    Built here because submitit is an optional dependency (the `sweeps` extra)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SqueueWatcher(SlurmInfoWatcher):
        def __init__(self, delay_s: int = 60) -> None:
            super().__init__(delay_s)
            self.use_squeue = False

        def _make_command(self) -> list[str] | None:
            command = super()._make_command()  # sacct ... -j ID -j ID
            if command is None or not self.use_squeue:
                return command
            job_ids = [command[i + 1] for i, part in enumerate(command) if part == "-j"]
            # --states=all: finished jobs too, for as long as slurmctld keeps them (MinJobAge, 300 s by default)
            return ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%N", "--jobs", ",".join(job_ids)]

        def update(self) -> None:
            command = self._make_command()
            if command is None:
                return
            self._num_calls += 1
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired) as err:
                result = subprocess.CompletedProcess(command, 1, "", str(err))
            if result.returncode != 0 and not self.use_squeue:
                self.use_squeue = True
                log.warning(
                    "sacct cannot report job states here (%s): this cluster keeps no accounting database; "
                    "reading them from squeue instead (shown once)", result.stderr.strip() or f"exit status {result.returncode}",
                )
                self._num_calls -= 1
                return self.update()
            seen: dict[str, dict[str, str]] = {}
            if result.returncode == 0:
                seen = self.read_info(result.stdout if not self.use_squeue else "JobID|State|NodeList\n" + result.stdout)
                self._info_dict.update(seen)
            if self.use_squeue and (result.returncode == 0 or "Invalid job id" in result.stderr):
                # A job squeue no longer knows ended long ago; submitit then looks for its result file.
                for job_id in self._registered - self._finished - seen.keys():
                    self._info_dict[job_id] = {"JobID": job_id, "State": "GONE"}
            self._last_status_check = time.time()
            self._finished |= {job_id for job_id in self._registered - self._finished if self.is_done(job_id, mode="cache")}

    return SqueueWatcher(delay_s=60)


class SlurmJobStates(Callback):
    """Hydra callback (see conf/train.yaml): a multirun on SLURM polls its jobs with SqueueWatcher."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.launcher.get("_target_", "").endswith("submitit_launcher.SlurmLauncher"):
            from submitit.slurm.slurm import SlurmJob

            SlurmJob.watcher = squeue_watcher()  # one poller shared by all jobs, as in submitit
