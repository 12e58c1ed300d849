"""MedMNIST `.npz` files, the bundled 28 px PneumoniaMNIST by default, with their official splits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xray_cls.core.errors import UserInputError
from xray_cls.core.task import MAX_CLASSES, PNEUMONIA, Task, check_labels_are_classes, make_task
from xray_cls.data import npz
from xray_cls.data.datamodule import XrayDataModule
from xray_cls.data.images import resize_uint8
from xray_cls.data.options import MAX_IMAGE_SIZE, SPLITS
from xray_cls.data.splits import Split

log = logging.getLogger(__name__)


BUNDLED_NPZ = Path(__file__).parent.parent / "bundled" / "pneumoniamnist.npz"


def read_npz(path: Path, splits: tuple[str, ...] = SPLITS) -> dict[str, Split]:
    """MedMNIST layout: {train,val,test}_{images,labels}, images (N, H, W) or (N, H, W, C) of any
    numeric type, read as uint8 gray (`npz.gray_images`); every entry checked before it is read."""
    keys = [f"{split}_{part}" for split in splits for part in ("images", "labels")]
    arrays = npz.read_arrays(path, keys)
    where = npz.expected_npz(path)
    read = {}
    unit = npz.unit_floats([arrays[f"{name}_images"] for name in splits])
    for name in splits:
        images = npz.gray_images(arrays.pop(f"{name}_images"), where, f"{name}_images", unit)
        labels = npz.labels_of(arrays.pop(f"{name}_labels"), len(images), where, f"{name}_labels")
        if 0 in images.shape[1:]:
            raise UserInputError(f"{where}: {name}_images are empty pictures (shape {npz.shape_text(images.shape)}); "
                                 "expected images of at least one pixel")
        read[name] = Split(torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1), torch.from_numpy(labels))
    return read


def square_splits(splits: dict[str, Split], size: int | None, geometry: str, where: str) -> dict[str, Split]:
    """Every split at one square size: `size` (data.image_size), else the train split's short side,
    non-square or differently sized images fitted by `geometry` as a folder's are."""
    first = splits["train"] if "train" in splits else next(iter(splits.values()))
    target = size or min(first.source.shape[-2:])
    if size is None and target > MAX_IMAGE_SIZE:
        raise UserInputError(f"{where} holds {target} px images, more than {MAX_IMAGE_SIZE}; expected data.image_size=<at most "
                             f"{MAX_IMAGE_SIZE}> to resize them")
    return {name: s if s.source.shape[-2:] == (target, target) else Split(resize_uint8(s.source, target, geometry), s.labels)
            for name, s in splits.items()}


def npz_task(path: Path, splits: dict[str, Split], task: Task, widen: bool = True) -> Task:
    """The task of an .npz's labels: `task`'s classes when they cover them (task=pneumonia for
    PneumoniaMNIST, or data.classes); more labels than task=pneumonia's two make an N-class task
    whose classes are named class_0, class_1, ... (MedMNIST files hold numbers, not names)."""
    labels = [s.labels for s in splits.values() if len(s.labels)]
    low = min(int(x.min()) for x in labels) if labels else 0
    high = max(int(x.max()) for x in labels) if labels else 0
    named = ", ".join(f"{i} ({n})" for i, n in enumerate(task.classes))
    if low < 0 or high >= MAX_CLASSES:
        raise UserInputError(f"data.path: {path} holds labels from {low} to {high}; expected labels 0 to at most {MAX_CLASSES - 1}")
    if high < len(task.classes):
        return task
    if not widen:  # evaluate: the checkpoint's classes are the ones the labels must be
        raise UserInputError(f"data.path: {path} holds labels up to {high}; the checkpoint's classes are {named}: "
                             "expected data whose labels are its classes")
    if task != PNEUMONIA:
        raise UserInputError(f"data.path: {path} holds labels up to {high}; data.classes names {named}: expected one name per label")
    names = tuple(f"class_{i}" for i in range(high + 1))
    log.info("data.path: %s holds %d labels: %d classes, named %s to %s (name them with data.classes=[...])",
             path, high + 1, high + 1, names[0], names[-1])
    return Task("npz", names)


class PneumoniaMNISTDataModule(XrayDataModule):
    """MedMNIST `.npz` (the bundled 28 px PneumoniaMNIST by default) with its official splits.
    Its labels are its classes: two are task=pneumonia's NORMAL and PNEUMONIA, more are N-class
    (named by data.classes, else class_0, class_1, ...)."""

    def __init__(self, path: str | None = None, classes: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = Path(path) if path else BUNDLED_NPZ
        check_labels_are_classes(self.task)
        if classes is not None:
            self.task = make_task(self.task.record(), list(classes))

    def source_text(self) -> str:
        return npz.expected_npz(self.path)

    def read_splits(self) -> dict[str, Split]:
        splits = read_npz(self.path, (self.only_split,) if self.only_split else SPLITS)
        self.task = npz_task(self.path, splits, self.task, widen=self.only_split is None)
        return square_splits(splits, self.requested_size, self.geometry, npz.expected_npz(self.path))
