"""Interrupting a run and resuming it (`ckpt_path=`) to the result an uninterrupted run would give.

Lightning restores weights, optimizer, scheduler, loop counters and callback state. On one device
two more things make the continuation exact:
- every checkpoint carries the random generators (augmentation, dropout), restored on resume;
- each epoch's train order depends only on the seed and the epoch (`data.EpochShuffle`), and an
  epoch resumed from a mid-epoch checkpoint skips the batches it already trained on.
Ctrl+C (SIGINT) saves such a checkpoint as last.ckpt after the current batch, then stops the run;
a run killed outright (SIGKILL, a lost node) resumes from the last.ckpt of its last whole epoch.
Under DDP every process keeps its own generators: all of them go into the checkpoint, and each
process gets its own back, so a DDP run resumed from an epoch-end checkpoint is exact too.

A SLURM job that the scheduler restarts (preemption, `scontrol requeue`, a failed node) runs the
same command again in the same run folder: `requeued_checkpoint` finds the run's last.ckpt there,
so the job continues its run instead of refusing the folder.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from xray_cls.errors import RunInterrupted, UserInputError

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, whose restored state names only files of this run's own
    checkpoints/ folder.

    Lightning keeps absolute paths in a checkpoint's callback state (the best checkpoint, the last
    one, the top k) and deletes a superseded best or last file by that path. A run folder that was
    moved or copied would then test, or delete, the files of its old place, and a crafted
    last.ckpt could name any file. Every restored path is re-rooted to this folder by its file
    name, which must be a plain `*.ckpt` name.
    """

    def _generate_state_key(self, **kwargs: Any) -> str:
        return f"ModelCheckpoint{kwargs!r}"  # the key checkpoints of ModelCheckpoint itself were saved under

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict, dirpath=self.dirpath)
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            state[key] = self._own_path(state.get(key))
        state["best_k_models"] = {self._own_path(k): v for k, v in (state.get("best_k_models") or {}).items()}
        super().load_state_dict(state)

    def _own_path(self, path: Any) -> str:
        if not path:
            return ""
        name = Path(str(path)).name
        if not name.endswith(".ckpt") or name.startswith(".") or name != os.path.basename(str(path)):
            raise UserInputError(f"a checkpoint names {str(path)[:200]!r} as one of its run's checkpoints; expected a .ckpt file name")
        return str(Path(self.dirpath) / name)


class ResumableTraining(L.Callback):
    """Random generator states in every checkpoint; Ctrl+C checkpoints at a batch boundary, then stops."""

    def __init__(self, last_checkpoint: Path) -> None:
        self.last_checkpoint = last_checkpoint
        self.stop_requested = False
        self._previous_handler: Any = None
        self.seconds_before = 0.0  # training time of the run before this process resumed it
        self._started: float | None = None

    def train_seconds(self) -> float:
        """Training time of the whole run: its earlier starts up to their last checkpoint, and this one."""
        return self.seconds_before + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds_before = state_dict.get("train_seconds", 0.0)

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = _rng_states()
        if trainer.world_size > 1:  # every process saves together (ModelCheckpoint runs on all of them)
            per_rank: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(per_rank, _rng_states())
            checkpoint["rng_states_per_rank"] = per_rank

    def on_load_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        per_rank = checkpoint.get("rng_states_per_rank") or []
        if trainer.world_size > 1:
            if len(per_rank) == trainer.world_size:
                states = per_rank[trainer.global_rank]
            else:
                log.warning(
                    "the checkpoint holds the random generator states of %d process(es), this run has %d: "
                    "the resumed run will differ from an uninterrupted one", max(len(per_rank), 1), trainer.world_size,
                )
        if states is None:
            log.warning("the checkpoint holds no random generator states: the resumed run will differ from an uninterrupted one")
            return
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Under DDP every process gets the Ctrl+C at a different batch: Lightning's own handling stays.
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._request_stop)

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl+C stops at once
        log.warning("Ctrl+C: stopping after this batch, with a checkpoint (press it again to stop at once)")

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.stop_requested:
            trainer.save_checkpoint(self.last_checkpoint, weights_only=False)  # the full training state
            raise RunInterrupted(
                f"run stopped in epoch {trainer.current_epoch} after {trainer.global_step} steps; checkpoint "
                f"{self.last_checkpoint}; resume with the same overrides and ckpt_path={self.last_checkpoint}"
            )

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()


def _rng_states() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def requeued_checkpoint(cfg: DictConfig) -> Path | None:
    """In a SLURM job that the scheduler has restarted, the last.ckpt that an earlier start of this
    job left in its run folder, if that run is unfinished and of the same config; otherwise None
    (and a folder holding a finished run or another config is refused as ever)."""
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None
    run_dir = Path(cfg.paths.output_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file() or not (run_dir / "config.yaml").is_file() or (run_dir / "metrics.json").exists():
        return None
    changed = config_changes(run_dir, cfg)
    if changed:
        log.warning("the run folder %s holds a run of another config (%s): not resuming it", run_dir, ", ".join(changed))
        return None
    log.info("SLURM restarted this job (restart %s): continuing its run from %s", os.environ["SLURM_RESTART_COUNT"], last)
    return last


def resume_folder(ckpt_path: Path) -> Path:
    """The run folder a checkpoint belongs to, where the resumed run carries on. Refused when the
    file is not a checkpoint of ours, is not inside a run's checkpoints/ folder, or the run has
    already finished."""
    from xray_cls.checkpoint import read_checkpoint

    read_checkpoint(ckpt_path, "ckpt_path")
    run_dir = ckpt_path.parent.parent
    if ckpt_path.parent.name != "checkpoints" or not (run_dir / "config.yaml").is_file():
        raise UserInputError(
            f"ckpt_path={ckpt_path} is not inside a run folder (<run>/checkpoints/ beside <run>/config.yaml); "
            "resume from the checkpoints of the interrupted run itself"
        )
    if (run_dir / "metrics.json").exists():
        raise UserInputError(
            f"ckpt_path={ckpt_path}: the run {run_dir} has already finished (it has metrics.json); "
            "resuming it would overwrite its results, and ckpt_path= only continues interrupted runs"
        )
    return run_dir.absolute()


def check_same_network(ckpt_path: Path, net_cfg: dict[str, Any]) -> None:
    """A run resumes only with the network it was trained with: name both when they differ."""
    from xray_cls.checkpoint import check_state_dict, network_name, read_checkpoint

    checkpoint = read_checkpoint(ckpt_path, "ckpt_path")
    trained = checkpoint["hyper_parameters"]["net"]
    if trained != net_cfg:
        differ = sorted(k for k in trained.keys() | net_cfg.keys() if trained.get(k) != net_cfg.get(k))
        raise UserInputError(
            f"ckpt_path={ckpt_path} was trained with model {network_name(trained)} but this run is configured "
            f"with {network_name(net_cfg)} (differing: {', '.join(f'{k}={trained.get(k)!r} vs {net_cfg.get(k)!r}' for k in differ)}); "
            "resume with the overrides the run was started with (see its config.yaml)"
        )
    check_state_dict(trained, checkpoint["state_dict"], f"ckpt_path={ckpt_path}")


def config_changes(run_dir: Path, cfg: DictConfig) -> list[str]:
    """The settings (dotted keys) in which `cfg` differs from the run's own config.yaml, apart from
    those that do not change the result."""
    saved = _in_run_folder(_flatten(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))))
    current = _in_run_folder(_flatten(OmegaConf.to_container(cfg, resolve=True)))
    ignored = {"ckpt_path", "paths.output_dir", "data.cache_dir", "trainer.enable_progress_bar"}
    display = ("callbacks.progress_bar.",)  # how the run is shown, not what it computes
    return [
        k for k in sorted(saved.keys() | current.keys())
        if k not in ignored and not k.startswith(display) and saved.get(k) != current.get(k)
    ]


def _in_run_folder(flat: dict[str, Any]) -> dict[str, Any]:
    """Paths inside the run folder (checkpoints/, the loggers' folders) written relative to it, so
    that a moved or copied run folder compares equal to where it was written."""
    out_dir = str(flat.get("paths.output_dir") or "")
    if not out_dir:
        return flat
    return {k: v.replace(out_dir, "<run>") if isinstance(v, str) else v for k, v in flat.items()}


def warn_config_changes(run_dir: Path, cfg: DictConfig) -> None:
    """Settings that differ from the run's own config.yaml make the result differ from an uninterrupted run."""
    changed = config_changes(run_dir, cfg)
    if changed:
        log.warning(
            "resuming with settings that differ from %s in: %s; the result will differ from an uninterrupted run",
            run_dir / "config.yaml", ", ".join(changed),
        )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat
