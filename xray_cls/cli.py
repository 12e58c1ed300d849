"""What the three commands (train, evaluate, predict) share: the config folder, fresh output
folders, quiet libraries and one-line errors."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from xray_cls.errors import RunError, RunInterrupted, UserInputError

# conf/ sits beside the package in a source checkout and inside it in an installed wheel.
_PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = next(p for p in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf") if p.is_dir())


def fresh_dir(base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first of them that this call could create.

    Hydra names output folders to the second, so two commands started in the same second would
    share (and overwrite) one; creating the folder here claims it atomically. The answer is kept in
    the environment, because Hydra resolves the folder again in this process and in the processes
    a launcher starts for the jobs of a sweep (joblib, submitit), which must not claim another.
    """
    key = "XRAY_CLS_DIR_" + hashlib.sha256(base.encode()).hexdigest()[:16]
    if key not in os.environ:
        for i in count():
            candidate = Path(base if i == 0 else f"{base}_{i}")
            try:
                candidate.mkdir(parents=True)
            except FileExistsError:
                continue
            os.environ[key] = str(candidate)
            break
    return os.environ[key]


OmegaConf.register_new_resolver("fresh_dir", fresh_dir, replace=True)


def optimization_direction(mode: str) -> str:
    """`maximize` for checkpoint.mode=max, `minimize` for min: a sweeper optimizes what the run monitors."""
    directions = {"max": "maximize", "min": "minimize"}
    if mode not in directions:
        raise UserInputError(f"checkpoint.mode={mode!r} is not valid; expected min or max")
    return directions[mode]


OmegaConf.register_new_resolver("direction", optimization_direction, replace=True)


def run_name() -> str:
    """The run's overrides (`model=mlp,optimizer.lr=0.01`): its name in MLflow and W&B."""
    from hydra.core.hydra_config import HydraConfig

    name = HydraConfig.get().job.override_dirname if HydraConfig.initialized() else ""
    return name or "defaults"


def sweep_name(default: str | None) -> str | None:
    """"xray_cls sweep <sweep folder>" in a multirun (the MLflow experiment and W&B group of its
    runs), `default` otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"xray_cls sweep {HydraConfig.get().sweep.dir}"
    return default


OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("sweep_name", sweep_name, replace=True)


def _not_an_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def quiet_libraries() -> None:
    # Lightning adds its own console handler; Hydra's handlers (console and the run's log file) suffice.
    logging.getLogger("lightning").handlers.clear()
    # pydicom's decoders log a traceback for every plugin that fails on a file before they raise; the
    # file then gets its one line from xray_cls.data.images. (Not "pydicom" itself: importing pydicom
    # sets that logger's level.)
    logging.getLogger("pydicom.pixels").setLevel(logging.CRITICAL)
    # A file name that is not UTF-8 reaches the console as text with surrogates: shown escaped, not a crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    # xray_cls.data.headers bounds every image from its header (Pillow's own error limit of pixels,
    # counting the bit depth); Pillow's warning at half that limit would only repeat the check.
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advert)  # a cloud-service tip
    # The data lives in memory: loader worker processes would only add start-up time.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")  # Lightning 2.6 on torch 2.14
    # Logged values come from torchmetrics' compute(), which already reduced them across processes.
    warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")
    # Resuming: data.EpochShuffle skips the batches a mid-epoch checkpoint has trained on, and the
    # run's own checkpoints/ folder is meant to be written to again.
    warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")
    warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
    # Lightning suggests `srun` on any machine that has SLURM. Outside a SLURM job that is noise; inside
    # one (a job that forgot `srun` before a multi-process run) it may explain a hang, so it stays.
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings("ignore", ".*The `srun` command is available on your system but is not used.*")


def return_freed_memory() -> None:
    """Hands the pages that glibc's malloc holds free back to the system (malloc_trim, about 3 ms).
    Each thread that allocates (torch's other OpenMP threads) has an arena of its own, which keeps
    much of what is freed in it: at 10,000 images of 128 px the val predictions alone left a run
    208 MB larger, and the peak grew with the folder (README, Performance). Nothing happens off
    glibc (macOS, musl), whose allocators are others."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return


def freed_memory_returner(every_seconds: float = 1.0) -> Any:
    """A callback that calls return_freed_memory after a batch of any loop, at most every
    `every_seconds`: often enough that a long epoch's freed buffers do not pile up (a 40,000-image
    folder at 128 px: a step takes about 0.4 s), seldom enough to cost nothing measurable at 28 px."""
    from lightning.pytorch.callbacks import Callback

    class ReturnFreedMemory(Callback):
        def __init__(self) -> None:
            self._returned_at = time.monotonic()

        def _after_batch(self, *args: Any) -> None:
            now = time.monotonic()
            if now - self._returned_at >= every_seconds:
                return_freed_memory()
                self._returned_at = now

        on_train_batch_end = on_validation_batch_end = on_test_batch_end = _after_batch

    return ReturnFreedMemory()


def progress_bar(refresh_seconds: float = 0.1) -> Any:
    """Lightning's progress bar (Rich where it is installed, as Lightning would choose, else tqdm),
    redrawn at most every `refresh_seconds` rather than after every batch, and without `v_num`:
    every run has its own folder, and the logger's version (`tensorboard`) would show as `v_num=oard`.

    Lightning's bars update their counters and metrics after every batch (and Rich redraws up to 100
    times a second from a thread); a step of the study's MLP takes a few milliseconds, so that work
    shows in the training time. The last batch of every loop is always drawn.
    """
    from importlib.util import find_spec

    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    if refresh_seconds <= 0:
        raise UserInputError(f"callbacks.progress_bar.refresh_seconds={refresh_seconds!r} is not valid; expected a number of seconds > 0")
    use_rich = find_spec("rich") is not None
    base = RichProgressBar if use_rich else TQDMProgressBar

    class ProgressBar(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            # Rich: redraws per second by its thread; tqdm: batches per redraw (gated by time below).
            super().__init__(refresh_rate=max(1, round(1 / refresh_seconds)) if use_rich else 1)
            self._drawn_at = float("-inf")  # the first batch is drawn

        def _due(self, done: int, total: Any) -> bool:
            # On every process but the first the bar is disabled: Lightning then never sets the
            # current dataloader, so its batch totals must not be asked for (under DDP they assert).
            if self.is_disabled:
                return False
            now = time.monotonic()
            total = total()
            if done < total and now - self._drawn_at < refresh_seconds:
                return False
            self._drawn_at = now
            return True

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self._due(batch_idx + 1, lambda: self.total_train_batches):
                super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)

        def on_validation_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int, *args: Any) -> None:
            if trainer.sanity_checking or self._due(batch_idx + 1, lambda: self.total_val_batches_current_dataloader):
                super().on_validation_batch_end(trainer, module, outputs, batch, batch_idx, *args)

        def on_test_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int, *args: Any) -> None:
            if self._due(batch_idx + 1, lambda: self.total_test_batches_current_dataloader):
                super().on_test_batch_end(trainer, module, outputs, batch, batch_idx, *args)

        def get_metrics(self, *args: Any) -> dict[str, Any]:
            metrics = super().get_metrics(*args)
            metrics.pop("v_num", None)
            return metrics

    return ProgressBar()


def run_error(err: BaseException | None) -> RunError | None:
    """The RunError behind `err`, also when Hydra's instantiate wrapped it; a write that found its
    disk full is one too (the user frees space), named by its file."""
    while err is not None:
        if isinstance(err, RunError):
            return err
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {err.filename}" if err.filename else ""
            return RunError(f"the disk is full{where} ({err.strerror}); free space and run the command again")
        err = err.__cause__
    return None


def error_line(err: BaseException) -> str:
    """One line that says what went wrong: the user's mistake as is, a bug with its exception type."""
    user_error = run_error(err)
    text = str(user_error) if user_error else f"{type(err).__name__}: {err}"
    return " ".join(text.split())


def exit_on_user_error(command: Callable[[], Any]) -> Any:
    """Run `command`; a RunError becomes `error: ...` on stderr and exit status 2, an interrupt
    (Ctrl+C) exit status 130. Anything else is a bug and keeps its traceback.
    """
    try:
        return command()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        user_error = run_error(err)
        if user_error is None:
            raise
        print(f"{'interrupted' if isinstance(user_error, RunInterrupted) else 'error'}: {error_line(err)}", file=sys.stderr)
        sys.exit(130 if isinstance(user_error, RunInterrupted) else 2)


def refuse_existing(path: Path, what: str, option: str) -> None:
    """Outputs never replace earlier results: stop before writing if `path` exists."""
    if path.exists():
        raise UserInputError(f"{option}: {path.parent} already holds {what} ({path.name}); choose a new folder")


def require(cfg: Any, key: str, expected: str) -> None:
    """A mandatory option (`???` in the config) that was not given: name it and an example."""
    if OmegaConf.is_missing(cfg, key):
        raise UserInputError(f"{key} is not set; expected {key}={expected}")
