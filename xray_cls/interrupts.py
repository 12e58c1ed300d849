"""Ctrl+C (SIGINT) and SIGTERM (a shell's `kill`, a scheduler's end of a job) as one line that says
what to do next, in every phase of a command.

Python turns SIGINT into a KeyboardInterrupt, which Lightning catches inside `fit` and `test` and
ends the process with exit status 1 and no word of what was kept; SIGTERM kills the process where
it stands, or (inside `fit`) lets Lightning finish the epoch and exit with status 0, as if the run
had succeeded. Within `interruptible`, either signal raises `RunInterrupted` where the process is,
naming the signal and the advice the command gives (resume with ckpt_path=..., or run it again);
the CLI prints it as `interrupted: ...` and exits with 128 + the signal's number (130, 143). Files
are written atomically everywhere (`files.atomic_write`), so what a stopped command leaves is whole.
While a run trains, `callbacks.ResumableTraining` takes both signals instead: it checkpoints at the
end of the batch, then raises the same error.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from xray_cls.errors import RunInterrupted

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
        raise stopped(signum, advice())

    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
