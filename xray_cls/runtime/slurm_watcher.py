"""submitit's job-state poller for clusters without an accounting database (see xray_cls.runtime.slurm).
Imported only when a sweep runs on hydra-submitit-launcher: submitit is in the `sweeps` extra."""

from __future__ import annotations

import logging
import subprocess
import time

from submitit.slurm.slurm import SlurmInfoWatcher

log = logging.getLogger(__name__)


class SqueueWatcher(SlurmInfoWatcher):
    """submitit's SlurmInfoWatcher, reading `squeue` once `sacct` has failed."""

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
