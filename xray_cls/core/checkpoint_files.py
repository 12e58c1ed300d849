"""Writing checkpoints so that no crash, kill or full disk ever leaves a truncated one."""

from __future__ import annotations

import errno
import io
from pathlib import Path
from typing import Any

import torch

from xray_cls.core.errors import RunError
from xray_cls.core.files import atomic_write


class DiskFull(RunError):
    """A file could not be written because its disk (or quota) is full."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
WRITE_CHUNK = 2**20


def write_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """`checkpoint` at `path`, serialized in memory, then written under a temporary name beside
    `path`, flushed to disk (fsync) and renamed over it: a kill at any moment leaves the previous
    file or the new one, whole. A full disk raises DiskFull naming the folder; the files written
    before stay as they were."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    for orphan in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed while writing it
        orphan.unlink(missing_ok=True)  # only this process writes here: it holds the run folder's lock
    try:
        with atomic_write(path, durable=True) as tmp:
            write_bytes(tmp, buffer.getbuffer())
    except OSError as err:
        if err.errno in DISK_FULL:
            raise DiskFull(
                f"the disk of {path.parent} is full: {path.name} could not be written ({err.strerror}); the "
                "checkpoints written before it are intact: free space, then resume with ckpt_path=<run>/checkpoints/last.ckpt"
            ) from None
        raise


def write_bytes(path: Path, data: memoryview) -> None:
    with path.open("wb") as f:
        for start in range(0, len(data), WRITE_CHUNK):
            f.write(data[start : start + WRITE_CHUNK])
