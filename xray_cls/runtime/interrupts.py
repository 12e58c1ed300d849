"""Ctrl+C (SIGINT) and SIGTERM (a shell's `kill`, a scheduler's end of a job) as one line that says
what to do next, in every phase of a command.

Python turns SIGINT into a KeyboardInterrupt, which Lightning catches inside `fit` and `test` and
ends the process with exit status 1 and no word of what was kept; SIGTERM kills the process where
it stands, or (inside `fit`) lets Lightning finish the epoch and exit with status 0, as if the run
had succeeded. Within `interruptible`, either signal raises `RunInterrupted` where the process is,
naming the signal and the advice the command gives (resume with ckpt_path=..., or run it again);
the CLI prints it as `interrupted: ...` and exits with 128 + the signal's number (130, 143). Files
are written atomically everywhere (`core.files.atomic_write`), so what a stopped command leaves is
whole. While a run trains, `training.callbacks.ResumableTraining` takes both signals instead: it checkpoints at the
end of the batch, then raises the same error.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from xray_cls.core.errors import RunInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stopped(signum: int, advice: str) -> RunInterrupted:
    """The error a signal becomes: `<SIGNAL> received; <advice>`, with its exit status."""
    return RunInterrupted(f"{signal.Signals(signum).name} received; {advice}", signum)


@contextmanager
def interruptible(advice: Callable[[], str]) -> Iterator[None]:
    """SIGINT and SIGTERM raise `stopped(signal, advice())` within the block (the handlers before
    it are restored after). Outside the main thread, where Python delivers no signal, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if not in_charge(owner):
            return
        if signum == signal.SIGINT and distributed():
            raise KeyboardInterrupt  # Lightning's own handling of it stops every DDP process together
        if signum == signal.SIGTERM and distributed():
            return  # Lightning's own SIGTERM handler, which runs before this one, stops every process together
        raise stopped(signum, advice())

    owner = os.getpid()
    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    try:
        yield
    finally:
        restore(previous)


def in_charge(owner: int) -> bool:
    """Whether this process is the one that installed a handler. A DataLoader worker forked from it
    inherits the handler, and leaves the signal to its parent, which stops it with the run."""
    return os.getpid() == owner


def distributed() -> bool:
    """Whether this process is one of several of a DDP run."""
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def restore(handlers: dict[int, Any]) -> None:
    """The signals' earlier handlers back, the signals held meanwhile, so that one arriving halfway
    is not handled by neither or lost: it is handled by the restored handler once they are."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, list(handlers))
    try:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
