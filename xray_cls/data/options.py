"""The data's options (data.*), and the names they choose among, declared without importing torch."""

from __future__ import annotations

from xray_cls.core.options import choice, number

AUGMENTATIONS = ("none", "mild", "strong")  # data.aug: the presets of data/augment.py
GEOMETRIES = ("crop", "stretch")  # data.geometry: how a non-square image becomes square (data/images.py)
SPLITS = ("train", "val", "test")
UNCERTAIN = ("ignore", "zeros", "ones")  # data.uncertain: CheXpert's uncertainty policies (Irvin et al. 2019)
MAX_IMAGE_SIZE = 2048  # the largest side images are resized to (data.image_size, a checkpoint's preprocessing)

DATA = [
    choice("data.aug", AUGMENTATIONS, "a known augmentation preset"),
    choice("data.geometry", GEOMETRIES),
    number("data.batch_size", 1, integer=True),
    number("data.image_size", 1, MAX_IMAGE_SIZE, integer=True, none=True),
    number("data.aspect", 0, 10, high_open=True),
    number("data.mixup", 0, 10, expected="a number in [0, 10] (0: off)"),
    number("data.val_fraction", 0, 1, low_open=True, high_open=True),
    number("data.test_fraction", 0, 1, low_open=True, high_open=True),
    number("data.min_val_images", 0, integer=True),
    number("data.num_workers", 0, integer=True),
    number("data.folds", 2, 100, integer=True, none=True, expected="null (one val split) or an integer from 2 to 100"),
    number("data.fold", 0, integer=True),
    number("data.fold_seed", integer=True),
    choice("data.uncertain", UNCERTAIN),
    number("data.max_missing", 0, 1),
]
