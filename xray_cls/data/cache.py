"""The on-disk cache of decoded image folders, so a second run skips decoding."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from xray_cls.data.datamodule import Split
from xray_cls.data.images import BIT_DEPTHS
from xray_cls.files import atomic_write

log = logging.getLogger(__name__)


# The decoded, resized images of a split folder are cached on disk, keyed by everything that
# changes them: each file's resolved path, size, times and inode, the image size and geometry, the
# bit-depth rule (bump CACHE_FORMAT when the decoding changes) and the decoders' versions.
CACHE_FORMAT = 2


def cache_path(
    cache_dir: Path, split_dir: Path, paths: list[Path], labels: list[int], size: int, geometry: str
) -> Path:
    import PIL
    import pydicom

    folder_id = hashlib.sha256(str(split_dir.resolve()).encode()).hexdigest()[:16]
    content = hashlib.sha256(
        f"{CACHE_FORMAT}\n{size}\n{geometry}\n{BIT_DEPTHS}\nPillow {PIL.__version__}\npydicom {pydicom.__version__}\n".encode()
    )
    for path, label in zip(paths, labels):
        # ctime changes with every write, even one whose mtime was set back; the inode with a replaced file
        stat = path.stat()
        content.update(
            f"{path.resolve()}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\t{stat.st_ctime_ns}\t{stat.st_ino}\n".encode()
        )
    return cache_dir / f"{folder_id}-{size}-{geometry}-{content.hexdigest()[:24]}.pt"


def load_cached_split(path: Path, labels: list[int], size: int) -> Split | None:
    """The cached split, or None when it is missing or does not hold what its key promises."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
        images, cached_labels = cached["images"], cached["labels"]
        valid = (
            images.dtype == torch.uint8
            and tuple(images.shape) == (len(labels), 1, size, size)
            and cached_labels.tolist() == labels
        )
    except Exception:  # truncated, corrupt or foreign file: rebuild it, never trust it
        valid = False
    if not valid:
        log.warning("image cache %s is unreadable or does not match its folder; rebuilding it", path)
        return None
    return Split(images, cached_labels)


def save_cached_split(path: Path, split: Split) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.pt"):  # older versions of this folder
        stale.unlink(missing_ok=True)
    with atomic_write(path) as tmp:
        torch.save({"images": split.images, "labels": split.labels}, tmp)
