"""The on-disk cache of decoded image folders, which is also what a run reads them from.

Each split folder's decoded images are one `.npy` file of uint8 (N, 1, size, size), memory-mapped
in place: batches are gathered from the page cache, so a folder larger than memory is served
without a second copy of it in the process's own memory.

An entry is written a chunk at a time under a temporary name and renamed once complete, so a
process killed mid-decode leaves no entry that a later run would trust; an entry whose header or
length does not match what its key promises is decoded again. Processes that need the same entry
at once (a joblib sweep, DDP ranks) take an exclusive lock on a file beside it: the first decodes,
the others wait, then map the finished file.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from xray_cls.core.files import atomic_write
from xray_cls.data.images import BIT_DEPTHS, decode_chunks

log = logging.getLogger(__name__)


# The decoded, resized images of a split folder are cached on disk, keyed by everything that
# changes them: the resolved split folders, each file's absolute path, label, size, times and
# inode (stat follows a symlink, so its target's), the image size and geometry, the bit-depth
# rule and entry format (bump CACHE_FORMAT when either changes) and the decoders' versions.
CACHE_FORMAT = 3


def cache_path(
    cache_dir: Path, split_dirs: list[Path], paths: list[Path], labels: list[int], size: int, geometry: str
) -> Path:
    import PIL
    import pydicom

    folder_id = hashlib.sha256(b"\n".join(os.fsencode(d.resolve()) for d in split_dirs)).hexdigest()[:16]
    content = hashlib.sha256(
        f"{CACHE_FORMAT}\n{size}\n{geometry}\n{BIT_DEPTHS}\nPillow {PIL.__version__}\npydicom {pydicom.__version__}\n".encode()
    )
    for path, label in zip(paths, labels):
        # ctime changes with every write, even one whose mtime was set back; the inode with a replaced
        # file. abspath, not resolve: resolving each file cost ~35k lstat calls at 5,000 images.
        # The name as the OS's bytes: a file name that is not valid UTF-8 is a key like any other.
        stat = path.stat()
        content.update(os.fsencode(os.path.abspath(path)))
        content.update(f"\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\t{stat.st_ctime_ns}\t{stat.st_ino}\n".encode())
    return cache_dir / f"{folder_id}-{size}-{geometry}-{content.hexdigest()[:24]}.npy"


def cached_images(path: Path, paths: list[Path], size: int, geometry: str, source: str) -> torch.Tensor:
    """The decoded images of `paths`, memory-mapped from the cache entry `path`; decoded into it
    first when it is missing or unsound, by whichever process takes its lock first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with entry_lock(path):
        images = load_cached_images(path, len(paths), size)
        if images is None:
            write_cached_images(path, paths, size, geometry, source)
            images = load_cached_images(path, len(paths), size)
    if images is None:  # only a file system that loses what was just written gets here
        raise OSError(f"the cache entry {path} was written but cannot be read back")
    log.info("%s: %d images memory-mapped from the cache %s", source, len(paths), path)
    return images


@contextmanager
def entry_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on `path`'s lock file (kept: deleting it would let two processes
    hold two different files' locks). In a cache that cannot be written, a finished entry is still
    read without one: entries only ever appear complete."""
    try:
        lock_file = path.with_name(path.name + ".lock").open("a")
    except OSError:
        if not path.is_file():
            raise
        yield
        return
    with lock_file as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish the cache entry %s", path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock, also when the process dies


def load_cached_images(path: Path, count: int, size: int) -> torch.Tensor | None:
    """The entry memory-mapped (copy-on-write: nothing writes it), or None when it is missing or
    does not hold exactly what its key promises."""
    if not path.is_file():
        return None
    try:
        images = np.load(path, mmap_mode="c")
        valid = (
            isinstance(images, np.memmap)
            and images.dtype == np.uint8
            and images.shape == (count, 1, size, size)
            and path.stat().st_size == images.offset + images.nbytes
        )
    except Exception:  # noqa: BLE001  truncated, corrupt or foreign file: rebuild it, never trust it
        valid = False
    if not valid:
        log.warning("image cache %s is unreadable or does not match its folder; rebuilding it", path)
        return None
    return torch.from_numpy(images)


def write_cached_images(path: Path, paths: list[Path], size: int, geometry: str, source: str) -> None:
    """Decodes `paths` into the entry `path` a chunk at a time. Called with the entry's lock held."""
    stale_prefix = path.name.rsplit("-", 1)[0] + "-"  # older versions of this folder at this size and geometry
    for stale in path.parent.glob(stale_prefix + "*"):
        if stale.suffix in (".npy", ".pt") and stale != path:  # .pt: the format before CACHE_FORMAT 3
            stale.unlink(missing_ok=True)  # a run still mapping it keeps its pages
    for orphan in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed while writing it
        orphan.unlink(missing_ok=True)
    started = time.monotonic()
    shape = (len(paths), 1, size, size)
    with atomic_write(path) as tmp, tmp.open("wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in decode_chunks(paths, size, geometry, source):
            f.write(chunk.tobytes())
        f.flush()
        os.fsync(f.fileno())  # complete on disk before the rename makes it an entry
    seconds = time.monotonic() - started
    log.info("%s: decoded %d images in %.1f s (%.0f images/s) into the cache %s",
             source, len(paths), seconds, len(paths) / max(seconds, 1e-9), path)
