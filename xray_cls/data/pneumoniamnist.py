"""MedMNIST `.npz` files, the bundled 28 px PneumoniaMNIST by default, with their official splits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xray_cls.data.datamodule import SPLITS, Split, XrayDataModule
from xray_cls.data.images import resize_uint8
from xray_cls.errors import UserInputError
from xray_cls.task import MAX_CLASSES, PNEUMONIA, Task, check_labels_are_classes, make_task

log = logging.getLogger(__name__)


BUNDLED_NPZ = Path(__file__).parent.parent / "bundled" / "pneumoniamnist.npz"


def read_npz(path: Path) -> dict[str, Split]:
    """MedMNIST layout: {train,val,test}_{images,labels}, images (N, H, W) or (N, H, W, C)."""
    if not path.is_file():
        raise UserInputError(f"data.path: {path} does not exist; expected a MedMNIST-style .npz file")
    try:
        archive = np.load(path)
    except (OSError, ValueError) as err:
        raise UserInputError(f"data.path: {path} is not a readable .npz file ({err})") from None
    expected = [f"{split}_{part}" for split in SPLITS for part in ("images", "labels")]
    missing = [key for key in expected if key not in archive.files]
    if missing:
        raise UserInputError(
            f"data.path: {path} lacks the key(s) {', '.join(missing)}; expected {', '.join(expected)}"
        )
    splits = {}
    for name in SPLITS:
        images = torch.from_numpy(archive[f"{name}_images"])
        if images.ndim == 4:  # colour MedMNIST sets: average to one channel, like folder images
            images = images.float().mean(dim=-1).round().to(torch.uint8)
        labels = torch.from_numpy(archive[f"{name}_labels"].reshape(-1).astype(np.int64))
        if len(labels) != len(images):
            raise UserInputError(f"data.path: {path} has {len(images)} {name} images and {len(labels)} labels; expected one label per image")
        splits[name] = Split(images.unsqueeze(1).contiguous(), labels)
    return splits


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

    def read_splits(self) -> dict[str, Split]:
        splits = read_npz(self.path)
        self.task = npz_task(self.path, splits, self.task, widen=self.only_split is None)
        if self.requested_size is not None:
            size = self.requested_size
            splits = {k: Split(resize_uint8(s.images, size, self.geometry), s.labels) for k, s in splits.items()}
        return splits
