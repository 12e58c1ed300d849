"""MedMNIST `.npz` files, the bundled 28 px PneumoniaMNIST by default, with their official splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from xray_cls.data.datamodule import SPLITS, Split, XrayDataModule
from xray_cls.data.images import resize_uint8
from xray_cls.errors import UserInputError
from xray_cls.task import PNEUMONIA, check_labels_are_classes


BUNDLED_NPZ = Path(__file__).parent.parent / "bundled" / "pneumoniamnist.npz"


def read_npz(path: Path, class_names: tuple[str, ...] = PNEUMONIA.classes) -> dict[str, Split]:
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
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(class_names):
            raise UserInputError(
                f"data.path: {path} holds {name} labels from {int(labels.min())} to {int(labels.max())}; expected "
                + ", ".join(f"{i} ({n})" for i, n in enumerate(class_names)) + " (more than two classes are not supported yet)"
            )
        splits[name] = Split(images.unsqueeze(1).contiguous(), labels)
    return splits


class PneumoniaMNISTDataModule(XrayDataModule):
    """MedMNIST `.npz` (the bundled 28 px PneumoniaMNIST by default) with its official splits."""

    def __init__(self, path: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = Path(path) if path else BUNDLED_NPZ
        check_labels_are_classes(self.task)

    def read_splits(self) -> dict[str, Split]:
        splits = read_npz(self.path, self.class_names)
        if self.requested_size is not None:
            size = self.requested_size
            splits = {k: Split(resize_uint8(s.images, size, self.geometry), s.labels) for k, s in splits.items()}
        return splits
