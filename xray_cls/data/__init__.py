"""Chest X-ray data: the bundled PneumoniaMNIST `.npz` or a Kermany-layout image folder.

- `datamodule`: splits (in memory or memory-mapped), loaders, normalization and the shared `XrayDataModule`;
- `pneumoniamnist`, `folder`: the two DataModules, one per kind of source;
- `images`: reading one file (JPEG, PNG, DICOM) as 8-bit gray, square and resized;
- `cache`: decoded folders kept on disk between runs, and memory-mapped from there;
- `augment`: train-time augmentation of whole batches.

The configs name `xray_cls.data.PneumoniaMNISTDataModule` and `xray_cls.data.ImageFolderDataModule`.
"""

from xray_cls.data.augment import AUGMENT_PRESETS, Augment, BatchAugment, augment_preset
from xray_cls.data.datamodule import (
    CLASS_NAMES,
    SPLITS,
    EpochShuffle,
    Evaluation,
    Split,
    XrayDataModule,
    chunks_mean_std,
    normalize,
    pixel_mean_std,
)
from xray_cls.data.folder import ImageFolderDataModule, patient_id, patient_split
from xray_cls.data.images import (
    GEOMETRIES,
    IMAGE_SUFFIXES,
    center_square,
    is_image_file,
    open_gray,
    read_image,
    read_images,
    resize_uint8,
    trained_geometry,
)
from xray_cls.data.pneumoniamnist import BUNDLED_NPZ, PneumoniaMNISTDataModule, read_npz
from xray_cls.data.table import TableDataModule

__all__ = [
    "AUGMENT_PRESETS",
    "BUNDLED_NPZ",
    "CLASS_NAMES",
    "GEOMETRIES",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "Augment",
    "BatchAugment",
    "EpochShuffle",
    "Evaluation",
    "ImageFolderDataModule",
    "PneumoniaMNISTDataModule",
    "Split",
    "TableDataModule",
    "XrayDataModule",
    "augment_preset",
    "center_square",
    "chunks_mean_std",
    "is_image_file",
    "normalize",
    "open_gray",
    "patient_id",
    "patient_split",
    "pixel_mean_std",
    "read_image",
    "read_images",
    "read_npz",
    "resize_uint8",
    "trained_geometry",
]
