"""What the commands (train, evaluate, predict, export, adapt, recalibrate) share on the command
line: a console without library noise, the start of a command on a checkpoint, and a user's
mistake as one line with exit status 2 instead of a traceback."""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from xray_cls.core.errors import RunError, RunInterrupted, UserInputError


def _not_an_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def quiet_libraries() -> None:
    # Lightning adds its own console handler when imported; Hydra's handlers (console and the
    # run's log file) suffice.
    import lightning  # noqa: F401

    logging.getLogger("lightning").handlers.clear()
    # pydicom's decoders log a traceback for every plugin that fails on a file before they raise; the
    # file then gets its one line from xray_cls.data.dicom. (Not "pydicom" itself: importing pydicom
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
    except KeyboardInterrupt:  # before a command's own handlers are in place (interrupts.interruptible)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        user_error = run_error(err)
        if user_error is None:
            raise
        interrupted = isinstance(user_error, RunInterrupted)
        print(f"{'interrupted' if interrupted else 'error'}: {error_line(err)}", file=sys.stderr)
        sys.exit(user_error.exit_status if interrupted else 2)


@contextmanager
def checkpoint_command(cfg: Any, options: Iterable[Any], results: list[str], what: str,
                       required: Mapping[str, str] | None = None) -> Iterator[Path]:
    """How a command on a checkpoint starts: its `options` checked, the libraries quieted, `ckpt`
    (and each of `required`: key, example) given, then its output folder held for the block and
    refused when it holds any of `results`. Yields the output folder."""
    from xray_cls.core.options import check_options
    from xray_cls.runtime.interrupts import interruptible
    from xray_cls.runtime.run_folder import taken

    check_options(cfg, options)
    quiet_libraries()
    for key, expected in {"ckpt": "outputs/<run>/checkpoints/best.ckpt", **(required or {})}.items():
        require(cfg, key, expected)
    out_dir = Path(cfg.paths.output_dir)
    with taken(out_dir, results, what), interruptible(lambda: f"{what} stopped unfinished ({', '.join(results)} not written); run the command again"):
        yield out_dir


def require(cfg: Any, key: str, expected: str) -> None:
    """A mandatory option (`???` in the config) that was not given: name it and an example. `key`
    may be a dotted path (data.root): is_missing looks at one node's own keys only."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if node is None or OmegaConf.is_missing(node, leaf):
        raise UserInputError(f"{key} is not set; expected {key}={expected}")
