"""A split's images and how they are served: `Split` (in memory or memory-mapped, a subset as row
indices), its batch Dataset, the resumable train order, and the pixel statistics that normalize them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

log = logging.getLogger(__name__)


@dataclass
class Split:
    """A split's images: all of `source`, or the `rows` of it that it picks. A subset (the val
    split drawn from train) indexes its source instead of copying it, so a memory-mapped source
    is never copied into the process's memory."""

    source: torch.Tensor  # uint8 (M, 1, H, W), in memory or memory-mapped
    labels: torch.Tensor  # int64 (N,)
    paths: list[Path] | None = None  # the image files, for splits read from a folder
    rows: torch.Tensor | None = None  # int64 (N,): the rows of `source` this split holds; None: all

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> torch.Tensor:
        """Every image of the split; a copy when it picks rows (loaders use `gather` instead)."""
        return self.source if self.rows is None else self.source[self.rows]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The images at positions `index` of this split, read from `source` in one indexing op."""
        return self.source[index if self.rows is None else self.rows[index]]

    def batches(self, size: int) -> Iterator[torch.Tensor]:
        """The split's images in order, `size` at a time: never all of them at once."""
        device = (self.source if self.rows is None else self.rows).device
        for start in range(0, len(self), size):
            yield self.gather(torch.arange(start, min(start + size, len(self)), device=device))

    def subset(self, index: torch.Tensor) -> Split:
        paths = [self.paths[i] for i in index.tolist()] if self.paths is not None else None
        rows = index if self.rows is None else self.rows[index]
        return Split(self.source, self.labels[index], paths, rows)

    def class_counts(self, n_classes: int = 2) -> list[int]:
        return torch.bincount(self.labels, minlength=n_classes).tolist()


class SplitDataset(Dataset):
    """A Split served a batch at a time: `__getitems__` indexes the tensors once per batch."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.gather(torch.tensor([i]))[0], self.split.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.split.gather(index), self.split.labels[index]


class EpochShuffle(Sampler[int]):
    """Train order drawn from (seed, epoch) alone, so a resumed run sees the same order as an
    uninterrupted one; an epoch resumed from a mid-epoch checkpoint starts after the
    `batches_done()` batches it already trained on. Lightning calls `set_epoch` every epoch."""

    def __init__(self, size: int, seed: int, batch_size: int, batches_done: Callable[[], int]) -> None:
        self.size, self.seed, self.batch_size, self.batches_done = size, seed, batch_size, batches_done
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size  # a whole epoch: Lightning counts the epoch's batches from it

    def __iter__(self) -> Iterator[int]:
        # hash() of a tuple of ints is the same in every process (only str hashes are salted).
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch)) % 2**63)
        order = torch.randperm(self.size, generator=generator)
        yield from order[self.batches_done() * self.batch_size :].tolist()


def batch_as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch  # __getitems__ already returns stacked tensors


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 pixels -> float, standardized with the train split's statistics."""
    return (images.float() / 255 - mean) / std


def pixel_mean_std(split: Split, chunk_bytes: int = 8 * 2**20) -> tuple[float, float]:
    """Mean and standard deviation of a split's uint8 pixels scaled to [0, 1], read a chunk of
    images at a time, so that a large split is never copied whole."""
    return chunks_mean_std(split.batches(max(1, chunk_bytes // max(1, split.source[0].numel()))))


def chunks_mean_std(chunks: Iterable[torch.Tensor]) -> tuple[float, float]:
    """Mean and standard deviation of uint8 pixels scaled to [0, 1], from a histogram of `chunks`."""
    counts = torch.zeros(256, dtype=torch.float64)
    for chunk in chunks:
        counts += torch.bincount(chunk.flatten(), minlength=256).cpu()
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum() / counts.sum()
    std = ((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt()
    return mean.item(), max(std.item(), 1e-6)


def fits_on_device(name: str, split: Split, device: torch.device) -> bool:
    """Whether a split takes at most half the GPU's free memory; a larger one (a big folder) is
    served from host memory or its mapped file instead."""
    needed = len(split) * split.source[0].numel() * split.source.element_size()
    free, _ = torch.cuda.mem_get_info(device)
    if needed <= free // 2:
        return True
    log.info("%s split: %.1f GB is more than half the GPU's free memory; its batches are copied from the host",
             name, needed / 2**30)
    return False
