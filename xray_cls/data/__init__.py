"""Layer 2, the data: chest X-ray images read as the networks take them, split and served.
May import: core.

- `options`: the data.* options and their choices (no torch import);
- `datamodule`: the LightningDataModule every source shares (`XrayDataModule`): loaders, normalization, the evaluation path;
- `splits`: a split's images (in memory or memory-mapped), its batches, train order and pixel statistics;
- `pneumoniamnist` (with `npz`, the reader that trusts no file), `folder`, `table`: the DataModules, one per kind of source;
- `images`, `dicom`, `headers`: reading one file (JPEG, PNG, DICOM) as 8-bit gray, its header checked, square and resized;
- `patients`: patient ids in Kermany file names, patient-level splits and folds;
- `cache`: decoded folders kept on disk between runs, and memory-mapped from there;
- `augment`: train-time augmentation of whole batches;
- `inputs`: the image files `predict` and `adapt` are pointed at.

The configs name `xray_cls.data.PneumoniaMNISTDataModule`, `xray_cls.data.ImageFolderDataModule`
and `xray_cls.data.TableDataModule`. The names below are imported when first used, so that
`xray_cls.data.options` is read without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "augment": ["AUGMENT_PRESETS", "Augment", "BatchAugment", "augment_preset"],
    "datamodule": ["CLASS_NAMES", "Evaluation", "XrayDataModule"],
    "splits": ["EpochShuffle", "Split", "chunks_mean_std", "normalize", "pixel_mean_std"],
    "folder": ["ImageFolderDataModule"],
    "patients": ["patient_id", "patient_split"],
    "images": ["IMAGE_SUFFIXES", "center_square", "is_image_file", "open_gray", "read_image", "read_images", "resize_uint8",
               "trained_geometry"],
    "options": ["GEOMETRIES", "SPLITS"],
    "pneumoniamnist": ["BUNDLED_NPZ", "PneumoniaMNISTDataModule", "read_npz"],
    "table": ["TableDataModule"],
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME_OF)


def __getattr__(name: str) -> Any:
    if name not in _HOME_OF:
        raise AttributeError(f"module 'xray_cls.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"xray_cls.data.{_HOME_OF[name]}"), name)
