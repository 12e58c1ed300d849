"""Claiming a command's output folder before anything is written into it.

Hydra writes `.hydra/` (config.yaml, hydra.yaml, overrides.yaml) into a run's folder before the
command itself starts. A command refused because its folder already holds results (an explicit
`hydra.run.dir=` of a finished run) would thus have replaced that run's record, which the sweep
report and resume read. `ClaimOutputFolder` runs first (Hydra's `on_run_start` and
`on_multirun_start`): it takes an exclusive lock on the folder, which the process holds until it
exits, so that two commands started into one folder cannot both go on, and it refuses a folder that
holds what the command would write, with one line and exit status 2, before Hydra writes a byte.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from xray_cls.core.errors import UserInputError

_HELD: dict[str, int] = {}  # resolved folder -> the descriptor whose lock this process holds


def claim(folder: Path) -> bool:
    """Lock `folder` (created if missing) for this process, or refuse: another command holds it.
    Returns whether this call took the lock (False: this process already held it); the lock goes
    with `release`, or with the process, however it ends."""
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        return False
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserInputError(
            f"{folder} is in use by another command (it holds the folder's lock); choose another folder"
        ) from None
    _HELD[key] = fd
    return True


def release(folder: Path) -> None:
    fd = _HELD.pop(str(folder.resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases its lock


@contextmanager
def held(folder: Path) -> Iterator[None]:
    """`folder` claimed for the block, released after it unless this process held it already."""
    taken = claim(folder)
    try:
        yield
    finally:
        if taken:
            release(folder)


@contextmanager
def taken(folder: Path, results: list[str], what: str) -> Iterator[None]:
    """`folder` held for the block, refused first when it holds any of `results`: how evaluate,
    predict and export take their output folder (the Hydra callback has done it for the CLI)."""
    if not folder.exists():  # nothing to refuse or lock yet; a command that fails early leaves no folder
        yield
        return
    with held(folder):
        refuse_results(folder, results, what)
        yield


def is_first_process() -> bool:
    """False in the other processes of a multi-process run (DDP's children, SLURM's other tasks),
    which write into the folder the first one claimed."""
    return all(os.environ.get(name, "0") == "0" for name in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))


def refuse_results(folder: Path, results: list[str], what: str, kind: str = "output") -> None:
    """Refuse `folder` when it holds any of `results` (file or folder names, or glob patterns)."""
    found = next((name for name in results if any(folder.glob(name))), None)
    if found:
        raise UserInputError(
            f"the {kind} folder {folder} already holds {what} ({found}); choose a new "
            f"{'hydra.sweep.dir' if kind == 'sweep' else 'hydra.run.dir'} (nothing was "
            "written)" + (", or resume an interrupted run with ckpt_path=<run>/checkpoints/last.ckpt" if kind in ("run", "pretraining") else "")
        )


class ClaimOutputFolder(Callback):
    """Hydra callback: claims the command's output folder (a multirun's sweep folder) and refuses
    one that holds `results` (a sweep folder: runs), before Hydra writes anything into it.
    Configured per command in conf/: `what` names the results, `kind` the folder."""

    def __init__(self, results: list[str], what: str, kind: str = "output") -> None:
        self.results, self.what, self.kind = list(results), what, kind

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("ckpt_path"):  # a resume writes into its checkpoint's run folder, claimed there (train.py)
            return
        self._claim(Path(config.hydra.run.dir), lambda folder: refuse_results(folder, self.results, self.what, self.kind))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Each job of a sweep into a folder that holds runs would replace a run's .hydra/ record.
        self._claim(Path(config.hydra.sweep.dir), lambda folder: refuse_results(folder, ["*/.hydra"], "runs", "sweep"))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def _claim(self, folder: Path, refuse: Any) -> None:
        self.folder = None
        if not is_first_process():
            return
        try:
            if claim(folder):
                self.folder = folder
            refuse(folder)
        except UserInputError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def _release(self) -> None:
        if getattr(self, "folder", None) is not None:
            release(self.folder)
            self.folder = None
