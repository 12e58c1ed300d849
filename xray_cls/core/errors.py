"""Errors a user can act on. The CLI prints them as one line, without a traceback."""

from __future__ import annotations

from typing import Any


class RunError(Exception):
    """A run cannot go on for a reason on the user's side; the message says what to change."""


class UserInputError(RunError, ValueError):
    """A path, file or option the user gave is wrong; the message names it and what was expected."""


class TrainingDivergedError(RunError, FloatingPointError):
    """The training loss stopped being finite."""


class RunInterrupted(RunError):
    """A signal stopped the command (Ctrl+C: SIGINT, or SIGTERM); the message says what to do next
    (where the run's checkpoint is). The process exits with 128 + the signal's number."""

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def is_number(value: Any, kind: type | tuple[type, ...] = (int, float)) -> bool:
    """Whether a config value is a number (of `kind`). YAML's true and false are not, although
    Python counts bool as an int."""
    return isinstance(value, kind) and not isinstance(value, bool)
