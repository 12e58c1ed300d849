"""The Lightning callbacks of a run, named by the configs in conf/callbacks/ and added by train.

- `ProgressBar`: Lightning's bar, redrawn by time rather than after every batch;
- `ReturnFreedMemory`: freed memory handed back after batches, at most once a second;
- `ResumableTraining`: random generator states in every checkpoint, Ctrl+C as a checkpoint, the run's training time;
- `RunCheckpoint`: Lightning's ModelCheckpoint, its restored paths kept inside the run's folder.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar

from xray_cls.core.errors import UserInputError
from xray_cls.core.memory import return_freed_memory
from xray_cls.core.options import check_number

log = logging.getLogger(__name__)


class _TimedDraws:
    """What makes Lightning's bar draw by time: at most every `refresh_seconds` rather than after
    every batch (a step of the study's MLP takes a few milliseconds, so that work shows in the
    training time), the last batch of every loop always; and no `v_num` (every run has its own
    folder, and the logger's version would show as `v_num=oard`)."""

    refresh_seconds: float
    _drawn_at: float

    def _due(self, done: int, total: Any) -> bool:
        # On every process but the first the bar is disabled: Lightning then never sets the
        # current dataloader, so its batch totals must not be asked for (under DDP they assert).
        if self.is_disabled:  # type: ignore[attr-defined]
            return False
        now = time.monotonic()
        if done < total() and now - self._drawn_at < self.refresh_seconds:
            return False
        self._drawn_at = now
        return True

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._due(batch_idx + 1, lambda: self.total_train_batches):  # type: ignore[attr-defined]
            super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)  # type: ignore[misc]

    def on_validation_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int, *args: Any) -> None:
        if trainer.sanity_checking or self._due(batch_idx + 1, lambda: self.total_val_batches_current_dataloader):  # type: ignore[attr-defined]
            super().on_validation_batch_end(trainer, module, outputs, batch, batch_idx, *args)  # type: ignore[misc]

    def on_test_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int, *args: Any) -> None:
        if self._due(batch_idx + 1, lambda: self.total_test_batches_current_dataloader):  # type: ignore[attr-defined]
            super().on_test_batch_end(trainer, module, outputs, batch, batch_idx, *args)  # type: ignore[misc]

    def get_metrics(self, *args: Any) -> dict[str, Any]:
        metrics = super().get_metrics(*args)  # type: ignore[misc]
        metrics.pop("v_num", None)
        return metrics


class RichTimedProgressBar(_TimedDraws, RichProgressBar):
    """Lightning's Rich bar, whose own thread redraws `1 / refresh_seconds` times a second."""

    def __init__(self, refresh_seconds: float = 0.1) -> None:
        self.refresh_seconds = check_number("callbacks.progress_bar.refresh_seconds", refresh_seconds, 0, low_open=True,
                                            expected="a number of seconds > 0")
        super().__init__(refresh_rate=max(1, round(1 / refresh_seconds)))
        self._drawn_at = float("-inf")  # the first batch is drawn


class TQDMTimedProgressBar(_TimedDraws, TQDMProgressBar):
    """Lightning's tqdm bar, asked to draw every batch and gated by time above."""

    def __init__(self, refresh_seconds: float = 0.1) -> None:
        self.refresh_seconds = check_number("callbacks.progress_bar.refresh_seconds", refresh_seconds, 0, low_open=True,
                                            expected="a number of seconds > 0")
        super().__init__(refresh_rate=1)
        self._drawn_at = float("-inf")


# Rich where it is installed, as Lightning would choose, else tqdm.
ProgressBar = RichTimedProgressBar if find_spec("rich") is not None else TQDMTimedProgressBar


class ReturnFreedMemory(L.Callback):
    """return_freed_memory after a batch of any loop, at most every `every_seconds`: often enough
    that a long epoch's freed buffers do not pile up (a 40,000-image folder at 128 px: a step
    takes about 0.4 s), seldom enough to cost nothing measurable at 28 px."""

    def __init__(self, every_seconds: float = 1.0) -> None:
        self.every_seconds = every_seconds
        self._returned_at = time.monotonic()

    def _after_batch(self, *args: Any) -> None:
        now = time.monotonic()
        if now - self._returned_at >= self.every_seconds:
            return_freed_memory()
            self._returned_at = now

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = _after_batch


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
    """Random generator states in every checkpoint; Ctrl+C (SIGINT) or SIGTERM checkpoints at a
    batch boundary, then stops the run (a second signal stops it at once)."""

    def __init__(self, last_checkpoint: Path) -> None:
        self.last_checkpoint = last_checkpoint
        self.stop_requested: int | None = None  # the signal that asked for the stop
        self._previous_handlers: dict[int, Any] = {}
        self._owner = os.getpid()
        self.seconds_before = 0.0  # training time of the run before this process resumed it
        self._started: float | None = None

    def train_seconds(self) -> float:
        """Training time of the whole run: its earlier starts up to their last checkpoint, and this one.

        Not Lightning's Timer: it times the train stage from on_train_start, after the sanity
        check, and train_seconds has always counted `trainer.fit` from on_fit_start (the sanity
        check included), which the speed benchmark compares with a hand-written loop's."""
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
        _set_rng_states(states)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Under DDP every process gets the signal at a different batch: Lightning's own handling stays.
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._owner = os.getpid()
            self._previous_handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def _request_stop(self, signum: int, frame: Any) -> None:
        from xray_cls.runtime.interrupts import in_charge

        if not in_charge(self._owner):  # a loader worker forked with this handler: its parent stops it
            return
        if self.stop_requested is not None:  # the second signal: at once, from the last epoch's checkpoint
            from xray_cls.runtime.interrupts import stopped

            last = f"ckpt_path={self.last_checkpoint}" if self.last_checkpoint.is_file() else "no checkpoint: run it again"
            raise stopped(signum, f"stopped at once; resume with the same overrides and {last}")
        self.stop_requested = signum
        log.warning("%s: stopping after this batch, with a checkpoint (send it again to stop at once)", signal.Signals(signum).name)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.stop_requested is not None:
            from xray_cls.runtime.interrupts import stopped

            trainer.save_checkpoint(self.last_checkpoint, weights_only=False)  # the full training state
            raise stopped(self.stop_requested, f"run stopped in epoch {trainer.current_epoch} after {trainer.global_step} steps; "
                                               f"checkpoint {self.last_checkpoint}; resume with the same overrides and "
                                               f"ckpt_path={self.last_checkpoint}")

    def _restore_handlers(self) -> None:
        from xray_cls.runtime.interrupts import restore

        restore(self._previous_handlers)
        self._previous_handlers = {}

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore_handlers()
        if self.stop_requested is not None:  # asked after the last batch (in its validation): the epoch's checkpoint is written
            from xray_cls.runtime.interrupts import stopped

            raise stopped(self.stop_requested, f"the run is unfinished (no metrics.json); resume with the same overrides and "
                                               f"ckpt_path={self.last_checkpoint}")

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()


def _rng_states() -> dict[str, Any]:
    """torch's generators, and numpy's and Python's (which transforms such as lightly's blur draw
    from), as tensors and numbers: a checkpoint holds no other objects."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": python_gauss}}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:  # absent from checkpoints written before
        state = states["numpy"]
        np.random.set_state(("MT19937", state["keys"].numpy().astype(np.uint32), state["position"], state["has_gauss"], state["gauss"]))
    if "python" in states:
        state = states["python"]
        random.setstate((state["version"], tuple(state["internal"].tolist()), state["gauss"]))
