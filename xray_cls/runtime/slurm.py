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


class SlurmJobStates(Callback):
    """Hydra callback (see conf/train.yaml): a multirun on SLURM polls its jobs with SqueueWatcher."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.launcher.get("_target_", "").endswith("submitit_launcher.SlurmLauncher"):
            from submitit.slurm.slurm import SlurmJob

            from xray_cls.runtime.slurm_watcher import SqueueWatcher

            SlurmJob.watcher = SqueueWatcher(delay_s=60)  # one poller shared by all jobs, as in submitit
