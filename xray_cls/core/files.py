"""Writing files so that no reader ever sees half of one: each is written to a temporary name
beside its target and renamed over it once complete (a rename within a folder is atomic)."""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The process's umask, read the only way POSIX allows (by setting it) and put back at once.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_write(path: Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path to write `path`'s content to: renamed to `path` when the block ends, removed
    if it raises. The temporary file is created anew with a random name (never an existing file or
    link), so concurrent writers never share one and a planted link is never written through; a
    link at `path` itself is replaced, not followed. `durable`: the content and the rename reach
    the disk (fsync) before the block returns, so a crash right after leaves the new file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from the user's group
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def path_text(path: str | os.PathLike[str]) -> str:
    """A path as text that can be written anywhere (CSV, JSON, logs, terminals). A file name that
    is not valid UTF-8 comes from the OS with its bad bytes as surrogates, which no UTF-8 writer
    accepts; they are written as `\\xNN`, as `ls -b` shows them, and a backslash as `\\\\`, so
    that the text still names exactly one file."""
    text = os.fspath(path)
    if "\\" not in text and not _SURROGATE.search(text):
        return text
    return _SURROGATE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", text.replace("\\", "\\\\"))


_SURROGATE = re.compile("[\udc80-\udcff]")


def write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_csv(path: Path, rows: Any, columns: list[str]) -> None:
    """`rows` (dicts) under a header of `columns`."""
    with atomic_write(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
