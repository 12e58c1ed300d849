"""Data: the bundled .npz, the Kermany folder layout, val split, normalization, augmentation, bad input."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from xray_cls.core.errors import UserInputError
from xray_cls.data import (
    AUGMENT_PRESETS,
    BUNDLED_NPZ,
    Augment,
    BatchAugment,
    ImageFolderDataModule,
    PneumoniaMNISTDataModule,
    is_image_file,
    open_gray,
    patient_split,
    pixel_mean_std,
    read_image,
    read_npz,
    resize_uint8,
)
from xray_cls.data.augment import mixup

from conftest import FOLDER_LAYOUT, at_depth, image_count, make_kermany_folder, write_dicom

# --- bundled PneumoniaMNIST ---------------------------------------------------------------------


def test_bundled_npz_has_the_official_splits() -> None:
    splits = read_npz(BUNDLED_NPZ)
    counts = {name: split.class_counts() for name, split in splits.items()}
    assert counts == {"train": [1214, 3494], "val": [135, 389], "test": [234, 390]}
    assert splits["train"].images.shape == (4708, 1, 28, 28)
    assert splits["train"].images.dtype == torch.uint8


def test_bundled_attribution_ships_beside_the_data() -> None:
    text = (BUNDLED_NPZ.parent / "README.md").read_text()
    assert "CC BY 4.0" in text and "MedMNIST v2" in text and "Kermany" in text


def test_npz_image_size_resizes_every_split() -> None:
    dm = PneumoniaMNISTDataModule(image_size=20)
    dm.setup()
    assert {tuple(s.images.shape[1:]) for s in dm.splits.values()} == {(1, 20, 20)}
    assert dm.image_size == 20


# --- Kermany folder layout ----------------------------------------------------------------------


def test_folder_reads_every_image_and_ignores_junk(kermany_root: Path) -> None:
    dm = ImageFolderDataModule(root=str(kermany_root), image_size=32, min_val_images=1000)
    dm.setup()
    n_train = image_count(FOLDER_LAYOUT, "train")
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == n_train
    assert len(dm.splits["test"]) == image_count(FOLDER_LAYOUT, "test")
    assert dm.splits["test"].class_counts() == [8, 12]
    for split in dm.splits.values():
        assert split.images.shape[1:] == (1, 32, 32)
        assert split.images.dtype == torch.uint8


def test_folder_converts_rgb_and_rgba_to_the_same_gray(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for name in ("NORMAL", "PNEUMONIA"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            Image.new("L", (30, 20), 200).save(folder / "gray.png")
            Image.new("RGB", (60, 45), (200, 200, 200)).save(folder / "rgb.png")
            Image.new("RGBA", (17, 33), (200, 200, 200, 255)).save(folder / "rgba.png")
            Image.new("I;16", (25, 25), 200 * 257).save(folder / "sixteen_bit.png")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, val_fraction=0.25)
    dm.setup()
    for split in dm.splits.values():
        assert (split.images == 200).all()


def test_val_split_is_stratified_disjoint_and_seeded() -> None:
    labels = torch.tensor([0] * 40 + [1] * 60)
    one_per_image = [str(i) for i in range(100)]
    train_a, val_a = patient_split(labels, one_per_image, 0.1, seed=1)
    train_b, val_b = patient_split(labels, one_per_image, 0.1, seed=1)
    _, val_c = patient_split(labels, one_per_image, 0.1, seed=2)
    assert torch.equal(val_a, val_b) and torch.equal(train_a, train_b)
    assert not torch.equal(val_a, val_c)
    assert torch.bincount(labels[val_a]).tolist() == [4, 6]
    assert set(train_a.tolist()).isdisjoint(val_a.tolist())
    assert sorted(train_a.tolist() + val_a.tolist()) == list(range(100))


def test_folder_without_val_splits_train(kermany_root: Path) -> None:
    dm = ImageFolderDataModule(root=str(kermany_root), image_size=16, val_fraction=0.2, seed=3)
    dm.setup()
    assert dm.splits["val"].class_counts() == [4, 6]  # 20% of 20 NORMAL and 30 PNEUMONIA
    assert dm.splits["train"].class_counts() == [16, 24]


def test_tiny_val_folder_joins_train_and_large_one_is_used(tmp_path: Path) -> None:
    layout = [*FOLDER_LAYOUT, ("val", "NORMAL", 2), ("val", "PNEUMONIA", 2)]
    root = make_kermany_folder(tmp_path / "data", layout)
    tiny = ImageFolderDataModule(root=str(root), image_size=16, val_fraction=0.1, min_val_images=16)
    tiny.setup()
    assert len(tiny.splits["train"]) + len(tiny.splits["val"]) == 54  # 50 train + 4 val
    used = ImageFolderDataModule(root=str(root), image_size=16, min_val_images=4)
    used.setup()
    assert used.splits["val"].class_counts() == [2, 2]
    assert len(used.splits["train"]) == 50


# --- normalization ------------------------------------------------------------------------------


def test_normalization_statistics_come_from_train_only(kermany_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(kermany_root, root)
    for path in (root / "test").rglob("img_*"):  # a very bright test split must not move the stats
        Image.new("L", (40, 40), 255).save(path)
    dm = ImageFolderDataModule(root=str(root), image_size=16, seed=0)
    dm.setup()
    train = dm.splits["train"].images.numpy().astype(np.float64) / 255
    assert dm.mean == pytest.approx(train.mean(), abs=1e-9)
    assert dm.std == pytest.approx(train.std(), abs=1e-9)
    normalized = dm.preprocess(dm.splits["train"].images)
    assert normalized.mean().item() == pytest.approx(0, abs=1e-4)
    assert normalized.std().item() == pytest.approx(1, abs=1e-2)


# --- augmentation -------------------------------------------------------------------------------


def test_presets_have_the_study_factors() -> None:
    assert AUGMENT_PRESETS["none"] == Augment(0, 0, 0)
    assert AUGMENT_PRESETS["mild"] == Augment(contrast=0.1, translate=0.12, zoom=0.13)
    assert AUGMENT_PRESETS["strong"] == Augment(contrast=0.2, translate=0.23, zoom=0.27)


def centered_square(n: int, size: int = 32, side: int = 4) -> torch.Tensor:
    images = torch.zeros(n, 1, size, size)
    lo = (size - side) // 2
    images[:, :, lo : lo + side, lo : lo + side] = 1.0
    return images


def test_none_preset_is_the_identity() -> None:
    images = torch.rand(8, 1, 28, 28)
    assert torch.equal(BatchAugment(AUGMENT_PRESETS["none"])(images), images)


def test_translation_stays_within_its_factor_and_varies_per_image() -> None:
    torch.manual_seed(0)
    size, factor = 32, 0.23
    out = BatchAugment(Augment(translate=factor))(centered_square(256, size))
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mass = out.sum(dim=(1, 2, 3))
    cy = (out[:, 0] * ys).sum(dim=(1, 2)) / mass
    cx = (out[:, 0] * xs).sum(dim=(1, 2)) / mass
    shift = torch.stack([cy, cx]) - (size - 1) / 2
    assert shift.abs().max() <= factor * size + 0.5
    assert shift.abs().max() > 0.6 * factor * size  # the range is used, not just a sliver of it
    assert shift.std(dim=1).min() > 1.0  # each image gets its own shift


def test_zoom_scales_area_within_its_factor() -> None:
    torch.manual_seed(0)
    factor, side = 0.27, 8
    out = BatchAugment(Augment(zoom=factor))(centered_square(256, 32, side))
    ratio = out.sum(dim=(1, 2, 3)) / side**2  # zoom z shows the square with area 1/z^2
    assert ratio.min() >= 1 / (1 + factor) ** 2 - 0.05
    assert ratio.max() <= 1 / (1 - factor) ** 2 + 0.05
    assert ratio.max() - ratio.min() > 0.5


def test_contrast_keeps_each_mean_and_scales_spread_within_its_factor() -> None:
    torch.manual_seed(0)
    images = 0.5 + 0.1 * torch.randn(256, 1, 28, 28).clamp(-2, 2)
    out = BatchAugment(Augment(contrast=0.2))(images)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), images.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    factor = out.std(dim=(1, 2, 3)) / images.std(dim=(1, 2, 3))
    assert 0.8 - 1e-4 <= factor.min() and factor.max() <= 1.2 + 1e-4
    assert factor.max() - factor.min() > 0.3


def test_strong_preset_keeps_shape_and_range_and_repeats_with_the_seed() -> None:
    images = torch.rand(16, 1, 28, 28)
    augment = BatchAugment(AUGMENT_PRESETS["strong"])
    torch.manual_seed(5)
    first = augment(images)
    torch.manual_seed(5)
    second = augment(images)
    assert first.shape == images.shape
    assert 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, second)
    assert not torch.allclose(first, images)


def test_mixup_blends_images_and_labels_by_the_same_weight() -> None:
    labels = torch.tensor([0, 1] * 32)
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()  # every pixel is the image's label
    torch.manual_seed(3)
    mixed, soft = mixup(images, labels, alpha=1.0)
    torch.testing.assert_close(mixed.mean(dim=(1, 2, 3)), soft)  # so each image's blend is its label's
    assert soft.dtype == torch.float32 and 0 <= soft.min() and soft.max() <= 1
    assert ((soft > 0) & (soft < 1)).any()  # pairs of unlike images got soft labels
    torch.manual_seed(3)
    again = mixup(images, labels, alpha=1.0)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], soft)


@pytest.mark.parametrize("alpha", [-0.1, "much", True])
def test_invalid_mixup_is_named(alpha: object) -> None:
    with pytest.raises(UserInputError, match=re.escape(f"data.mixup={alpha!r} is not valid")):
        PneumoniaMNISTDataModule(mixup=alpha)


class BatchProbe(L.LightningModule):
    """Records the batches (images and labels) the Trainer hands to each stage."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}
        self.labels: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        self.seen["train"].append(batch[0])
        self.labels["train"].append(batch[1])
        return self.layer(batch[0].mean().view(1, 1)).sum()

    def validation_step(self, batch, batch_idx):  # noqa: ANN001
        self.seen["val"].append(batch[0])
        self.labels["val"].append(batch[1])

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_augmentation_reaches_training_batches_only() -> None:
    dm = PneumoniaMNISTDataModule(aug="strong", batch_size=64)
    probe = BatchProbe()
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(probe, datamodule=dm)
    val_images = dm.splits["val"].images[:64]
    torch.testing.assert_close(probe.seen["val"][0], dm.preprocess(val_images))
    train_batch = probe.seen["train"][0]
    raw_values = {round(v, 4) for v in dm.preprocess(dm.splits["train"].images[:2000]).unique().tolist()}
    augmented_values = {round(v, 4) for v in train_batch.unique().tolist()}
    # Resampling and contrast make values that no raw uint8 pixel maps to.
    assert len(augmented_values - raw_values) > 100


def test_mixup_reaches_training_batches_only() -> None:
    dm = PneumoniaMNISTDataModule(mixup=0.4, batch_size=64)
    probe = BatchProbe()
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(probe, datamodule=dm)
    train_labels = torch.cat(probe.labels["train"])
    assert ((train_labels > 0) & (train_labels < 1)).any()
    torch.testing.assert_close(probe.labels["val"][0], dm.splits["val"].labels[:64])
    torch.testing.assert_close(probe.seen["val"][0], dm.preprocess(dm.splits["val"].images[:64]))


# --- bad input ----------------------------------------------------------------------------------


def test_missing_root_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserInputError, match=f"data.root: {missing} does not exist"):
        ImageFolderDataModule(root=str(missing)).setup()


def test_unset_root_says_how_to_set_it() -> None:
    with pytest.raises(UserInputError, match="data.root is not set"):
        ImageFolderDataModule(root=None)


def test_root_without_train_or_test_folder_is_named(kermany_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(kermany_root / "train", root / "training")
    with pytest.raises(UserInputError, match=r"has no train/ or test/ folder.*found \['training'\]"):
        ImageFolderDataModule(root=str(root)).setup()


def test_split_without_class_folder_names_it(kermany_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(kermany_root, root)
    shutil.rmtree(root / "test" / "PNEUMONIA")
    with pytest.raises(UserInputError, match=r"test has no PNEUMONIA folder.*found \['Normal'\]"):
        ImageFolderDataModule(root=str(root)).setup()


def test_class_folder_without_images_is_named(kermany_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(kermany_root, root)
    for path in (root / "train" / "NORMAL").glob("img_*"):
        path.unlink()
    with pytest.raises(UserInputError, match=r"train/NORMAL holds no images"):
        ImageFolderDataModule(root=str(root)).setup()


def test_corrupt_image_is_named(kermany_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(kermany_root, root)
    bad = root / "train" / "NORMAL" / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(UserInputError, match=f"{bad} is not a readable image"):
        ImageFolderDataModule(root=str(root)).setup()


# --- pixels: geometry, bit depth, DICOM ---------------------------------------------------------


def xray_like(height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 spanning exactly 0-255: a bright body on a dark background, with texture."""
    y, x = np.mgrid[:height, :width]
    body = np.exp(-(((x - width / 2) / (width / 3)) ** 2 + ((y - height / 2) / (height / 2.5)) ** 2))
    pixels = body + np.random.default_rng(0).normal(0, 0.05, (height, width))
    return ((pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255).round().astype(np.uint8)


def gray(path: Path) -> np.ndarray:
    return np.asarray(open_gray(path, 64))


def banded(path: Path, width: int, height: int) -> Path:
    """Gray 100 in the centred square on the short side, bright 250 bands outside it."""
    pixels = np.full((height, width), 250, np.uint8)
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    pixels[top : top + side, left : left + side] = 100
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("width, height", [(120, 60), (60, 120)])  # bands left/right, then top/bottom
def test_crop_removes_the_outer_bands_and_stretch_keeps_them(tmp_path: Path, width: int, height: int) -> None:
    path = banded(tmp_path / "banded.png", width, height)
    assert (read_image(path, 16, "crop") == 100).all()
    stretched = read_image(path, 16, "stretch")
    assert (stretched == 250).mean() >= 0.3  # the bands are half the image, less the blended seams
    edges = (stretched[:, [0, -1]] if width > height else stretched[[0, -1], :])
    assert (edges == 250).all()
    tensor = torch.from_numpy(np.array(Image.open(path)))[None, None]  # a non-square .npz is fitted alike
    assert (resize_uint8(tensor, 16, "crop") == 100).all()
    assert (resize_uint8(tensor, 16, "stretch") == 250).float().mean() >= 0.3


def test_folder_geometry_is_applied_and_recorded_for_the_checkpoint(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for name in ("NORMAL", "PNEUMONIA"):
            (tmp_path / split / name).mkdir(parents=True)
            banded(tmp_path / split / name / "wide.png", 90, 50)
            banded(tmp_path / split / name / "tall.png", 40, 70)
    default = ImageFolderDataModule(root=str(tmp_path), image_size=16, val_fraction=0.5)
    default.setup()
    assert default.preprocessing()["geometry"] == "crop"
    assert all((split.images == 100).all() for split in default.splits.values())
    stretched = ImageFolderDataModule(root=str(tmp_path), image_size=16, val_fraction=0.5, geometry="stretch")
    stretched.setup()
    assert stretched.preprocessing()["geometry"] == "stretch"
    assert all((split.images == 250).any(dim=(1, 2, 3)).all() for split in stretched.splits.values())


def test_unknown_geometry_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"data.geometry='squash' is not valid; expected one of crop, stretch"):
        ImageFolderDataModule(root=str(tmp_path), geometry="squash")


@pytest.mark.parametrize("bits", [8, 10, 12, 14, 16])
def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path: Path, bits: int) -> None:
    """A 16-bit PNG of 8, 10, 12, 14 or 16-bit data reads as the 8-bit picture, not a dark one."""
    picture = xray_like()
    Image.fromarray(at_depth(picture, bits)).save(tmp_path / "deep.png")
    Image.fromarray(picture).save(tmp_path / "plain.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")
    assert np.array_equal(gray(tmp_path / "deep.png"), picture)
    assert np.array_equal(gray(tmp_path / "plain.png"), picture)  # 8-bit stays as it is


def test_png_sbit_chunk_sets_the_depth(tmp_path: Path) -> None:
    """A dark 12-bit image (max 765 < 1024) that declares 12 significant bits is divided by 4095,
    not by the 1023 its brightest pixel alone suggests."""
    dark = xray_like().astype(np.uint16) * 3
    declared = PngInfo()
    declared.add(b"sBIT", bytes([12]))
    Image.fromarray(dark).save(tmp_path / "declared.png", pnginfo=declared)
    Image.fromarray(dark).save(tmp_path / "undeclared.png")
    assert np.array_equal(gray(tmp_path / "declared.png"), (dark / 4095 * 255).round())
    assert np.array_equal(gray(tmp_path / "undeclared.png"), (dark / 1023 * 255).round())


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_reads_as_the_8_bit_picture(tmp_path: Path, photometric: str) -> None:
    """12-bit stored values; MONOCHROME1 (0 is white) holds them inverted and is inverted back."""
    picture = xray_like()
    stored = at_depth(picture, 12)
    if photometric == "MONOCHROME1":
        stored = 4095 - stored
    path = write_dicom(tmp_path / "scan.DCM", stored, 12, photometric)
    assert is_image_file(path)
    assert np.array_equal(gray(path), picture)


def test_dicom_window_center_and_width_apply(tmp_path: Path) -> None:
    picture = xray_like()
    stored = 1000 + at_depth(picture, 11)  # 1000-3047 of 12 bits
    plain = gray(write_dicom(tmp_path / "plain.dcm", stored, 12))
    assert plain.max() == round(3047 / 4095 * 255)  # without a window: the 12-bit range
    windowed = gray(write_dicom(tmp_path / "windowed.dcm", stored, 12, WindowCenter=2024, WindowWidth=2048))
    assert np.abs(windowed.astype(int) - picture).max() <= 1  # the window spans the data: 0-255


def test_dicom_voi_lut_sequence_applies_before_its_window(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    picture = xray_like()
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.add_new("LUTData", "US", (4095 - np.arange(4096)).tolist())  # an inverting LUT
    path = write_dicom(tmp_path / "lut.dcm", at_depth(picture, 12), 12, VOILUTSequence=[lut],
                       WindowCenter=100, WindowWidth=10)  # the LUT wins over the window, as in pydicom
    assert np.array_equal(gray(path), 255 - picture)


def compress(path: Path, syntax: str, fragment: bytes) -> Path:
    """The DICOM at `path` rewritten with one encapsulated frame in a compressed transfer syntax."""
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def test_compressed_dicom_decodes_or_names_the_missing_decoder(tmp_path: Path) -> None:
    import io

    from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless

    picture = xray_like()
    jpeg = io.BytesIO()
    Image.fromarray(picture).save(jpeg, format="JPEG", quality=95)
    baseline = compress(write_dicom(tmp_path / "jpeg.dcm", picture, 8), JPEGBaseline8Bit, jpeg.getvalue())
    assert np.abs(gray(baseline).astype(int) - picture).mean() < 3  # decoded by Pillow
    jpeg_ls = compress(write_dicom(tmp_path / "jpegls.dcm", picture, 8), JPEGLSLossless, b"\xff\xd8\xff\xf7")
    with pytest.raises(UserInputError) as err:
        gray(jpeg_ls)
    message = str(err.value)
    assert "\n" not in message and str(jpeg_ls) in message
    assert "JPEG-LS" in message and "pylibjpeg" in message and "pip install" in message


def test_corrupt_dicom_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    with pytest.raises(UserInputError, match=f"{bad} is not a readable image"):
        gray(bad)
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(UserInputError, match="empty.dcm is not a readable image"):
        gray(tmp_path / "empty.dcm")


def test_multi_frame_dicom_is_refused(tmp_path: Path) -> None:
    cine = write_dicom(tmp_path / "cine.dcm", np.zeros((16, 8), np.uint8), 8, Rows=8, NumberOfFrames=2)
    with pytest.raises(UserInputError, match=f"{cine} holds 2 frames; expected a DICOM with one image"):
        gray(cine)


def test_npz_missing_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "partial.npz"
    arrays = dict(np.load(BUNDLED_NPZ))
    del arrays["val_labels"]
    np.savez(path, **arrays)
    with pytest.raises(UserInputError, match=f"{path} lacks the key\\(s\\) val_labels"):
        PneumoniaMNISTDataModule(path=str(path)).setup()


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(UserInputError, match="data.aug='heavy'.*expected one of none, mild, strong"):
        PneumoniaMNISTDataModule(aug="heavy")


@pytest.mark.parametrize("size", [0, -3, 6.5, "abc", True])
def test_image_size_must_be_a_positive_integer(size: object) -> None:
    with pytest.raises(UserInputError, match=f"data.image_size={size!r} is not valid; expected a positive integer"):
        PneumoniaMNISTDataModule(image_size=size)


# --- the on-disk cache of decoded folders -------------------------------------------------------


def cached_module(root: Path, cache: Path, size: int = 16, geometry: str = "crop") -> ImageFolderDataModule:
    dm = ImageFolderDataModule(root=str(root), image_size=size, cache_dir=str(cache), seed=0, geometry=geometry)
    dm.setup()
    return dm


@pytest.fixture()
def folder_copy(kermany_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(kermany_root, tmp_path / "data"))


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(paths, *args):
        raise AssertionError(f"decoded {len(paths)} images although the cache holds them")

    monkeypatch.setattr("xray_cls.data.folder.decode_images", fail)
    monkeypatch.setattr("xray_cls.data.cache.decode_chunks", fail)


def test_second_run_reads_the_cache(folder_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = cached_module(folder_copy, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # train and test
    forbid_decoding(monkeypatch)
    second = cached_module(folder_copy, tmp_path / "cache")
    for name in ("train", "val", "test"):
        assert torch.equal(first.splits[name].images, second.splits[name].images)
        assert torch.equal(first.splits[name].labels, second.splits[name].labels)


def test_added_file_invalidates_the_cache(folder_copy: Path, tmp_path: Path) -> None:
    before = cached_module(folder_copy, tmp_path / "cache")
    Image.new("L", (50, 50), 30).save(folder_copy / "test" / "Normal" / "new.png")
    after = cached_module(folder_copy, tmp_path / "cache")
    assert len(after.splits["test"]) == len(before.splits["test"]) + 1
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # the stale entry was replaced


def test_removed_file_invalidates_the_cache(folder_copy: Path, tmp_path: Path) -> None:
    before = cached_module(folder_copy, tmp_path / "cache")
    next((folder_copy / "test" / "PNEUMONIA").glob("img_*")).unlink()
    after = cached_module(folder_copy, tmp_path / "cache")
    assert after.splits["test"].class_counts() == [8, before.splits["test"].class_counts()[1] - 1]


def test_changed_file_invalidates_the_cache(folder_copy: Path, tmp_path: Path) -> None:
    cached_module(folder_copy, tmp_path / "cache")
    target = sorted((folder_copy / "test" / "Normal").glob("img_*"))[0]
    Image.new("L", (64, 48), 7).save(target, format="PNG" if target.suffix == ".png" else "JPEG")
    after = cached_module(folder_copy, tmp_path / "cache")
    fresh = ImageFolderDataModule(root=str(folder_copy), image_size=16, seed=0)
    fresh.setup()
    assert torch.equal(after.splits["test"].images, fresh.splits["test"].images)
    assert (after.splits["test"].images == 7).all(dim=(1, 2, 3)).sum() == 1


def test_other_image_size_or_geometry_gets_its_own_entry(folder_copy: Path, tmp_path: Path) -> None:
    cropped = cached_module(folder_copy, tmp_path / "cache", size=16)
    bigger = cached_module(folder_copy, tmp_path / "cache", size=24)
    assert bigger.splits["test"].images.shape[-2:] == (24, 24)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4
    stretched = cached_module(folder_copy, tmp_path / "cache", size=16, geometry="stretch")
    assert not torch.equal(stretched.splits["test"].images, cropped.splits["test"].images)  # its images are not square
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 6


def test_rewritten_file_with_its_old_size_and_times_is_decoded_again(folder_copy: Path, tmp_path: Path) -> None:
    """Same size, same mtime (set back with os.utime), other pixels: the ctime still tells."""
    scan = write_dicom(folder_copy / "test" / "Normal" / "scan.dcm", np.full((40, 50), 1000, np.uint16), 12)
    before = scan.stat()
    first = cached_module(folder_copy, tmp_path / "cache")
    write_dicom(scan, np.full((40, 50), 3000, np.uint16), 12)
    os.utime(scan, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = scan.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = cached_module(folder_copy, tmp_path / "cache")
    for split, value in ((first, 1000), (second, 3000)):
        assert (split.splits["test"].images == round(value / 4095 * 255)).all(dim=(1, 2, 3)).sum() == 1


def test_relative_and_absolute_root_share_one_entry(
    folder_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(folder_copy.parent)
    relative = cached_module(Path(folder_copy.name), tmp_path / "cache")
    forbid_decoding(monkeypatch)
    absolute = cached_module(folder_copy.resolve(), tmp_path / "cache")
    assert torch.equal(relative.splits["test"].images, absolute.splits["test"].images)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_other_decoder_versions_get_a_fresh_decode(folder_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import PIL
    import pydicom

    entries = set()
    for module, version in ((PIL, PIL.__version__), (PIL, "0.0"), (pydicom, "0.0")):
        monkeypatch.setattr(module, "__version__", version)
        cached_module(folder_copy, tmp_path / "cache")
        entries |= {p.name for p in (tmp_path / "cache").glob("*.npy")}
    assert len(entries) == 6  # train and test, under three keys


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape"])
def test_corrupt_cache_is_rebuilt_not_trusted(folder_copy: Path, tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    first = cached_module(folder_copy, cache)
    # Copied out first: damage written into a mapped file in place reaches its readers (SIGBUS for
    # a truncated one). The cache itself only ever renames complete files into place.
    expected = {name: first.splits[name].images.clone() for name in ("train", "test")}
    del first
    for entry in cache.glob("*.npy"):
        if damage == "garbage":
            entry.write_bytes(b"not a torch file")
        elif damage == "truncated":
            entry.write_bytes(entry.read_bytes()[:200])
        else:
            np.save(entry, np.load(entry)[:, :, :8, :8])
    rebuilt = cached_module(folder_copy, cache)
    for name in ("train", "test"):
        assert torch.equal(expected[name], rebuilt.splits[name].images)
    for entry in cache.glob("*.npy"):  # and the rebuilt entries are sound again
        assert np.load(entry).shape[-1] == 16


# --- folders served from their memory-mapped cache entry ----------------------------------------


def mapped_files() -> set[str]:
    """The files mapped into this process's memory."""
    return {line.split(maxsplit=5)[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}


def test_cached_splits_are_memory_mapped_and_val_is_not_copied(tmp_path: Path) -> None:
    layout = [*FOLDER_LAYOUT, ("val", "NORMAL", 2), ("val", "PNEUMONIA", 2)]  # a tiny val/ joins train
    root = make_kermany_folder(tmp_path / "data", layout)
    mapped = cached_module(root, tmp_path / "cache")
    entries = {str(p) for p in (tmp_path / "cache").glob("*.npy")}
    assert len(entries) == 2  # train with val/ in one entry, and test
    assert entries <= mapped_files()
    train, val = mapped.splits["train"], mapped.splits["val"]
    assert train.source is val.source and len(train.source) == 54  # both index the one mapped train file
    assert len(train) + len(val) == 54 and not set(train.rows.tolist()) & set(val.rows.tolist())
    in_memory = ImageFolderDataModule(root=str(root), image_size=16, seed=0)
    in_memory.setup()
    for name in ("train", "val", "test"):
        assert torch.equal(mapped.splits[name].images, in_memory.splits[name].images)
    assert (mapped.mean, mapped.std) == (in_memory.mean, in_memory.std)
    assert pixel_mean_std(train, chunk_bytes=1) == pytest.approx((mapped.mean, mapped.std), abs=1e-12)  # one image a chunk
    batch_images, batch_labels = next(iter(mapped.val_dataloader()))
    assert torch.equal(batch_images, val.images[: len(batch_images)])
    assert torch.equal(batch_labels, val.labels[: len(batch_labels)])


DIE_MIDWAY = """
import os, sys
from xray_cls.data import images, ImageFolderDataModule
images.DECODE_CHUNK = 8
real_read, decoded = images.read_image, []
def read_then_die(*args):
    decoded.append(1)
    if len(decoded) > 30:
        os._exit(9)  # as a killed process: no cleanup runs
    return real_read(*args)
images.read_image = read_then_die
ImageFolderDataModule(root=sys.argv[1], image_size=16, cache_dir=sys.argv[2]).setup()
"""


def test_decode_killed_midway_leaves_no_entry_a_later_run_trusts(folder_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", DIE_MIDWAY, str(folder_copy), str(cache)], capture_output=True, text=True, check=False)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert not list(cache.glob("*.npy"))
    orphans = list(cache.glob(".*.tmp"))
    assert len(orphans) == 1 and orphans[0].stat().st_size > 8 * 16 * 16  # chunks were written before it died
    after = cached_module(folder_copy, cache)
    fresh = ImageFolderDataModule(root=str(folder_copy), image_size=16, seed=0)
    fresh.setup()
    for name in ("train", "val", "test"):
        assert torch.equal(after.splits[name].images, fresh.splits[name].images)
    assert not list(cache.glob(".*.tmp"))  # the orphan was cleared under the entry's lock


def test_long_decode_logs_its_progress(folder_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("xray_cls.data.images.PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr("xray_cls.data.images.DECODE_CHUNK", 10)
    with caplog.at_level(logging.INFO, logger="xray_cls.data.images"):
        ImageFolderDataModule(root=str(folder_copy), image_size=16).setup()
    progress = [r.getMessage() for r in caplog.records if "images/s" in r.getMessage()]
    assert len(progress) == 4 + 1  # train: 10 to 40 of 50 images; test: 10 of 20
    assert re.fullmatch(rf"decoding {re.escape(str(folder_copy / 'train'))}: 10/50 images, \d+ images/s, \d+ s left", progress[0])


RACE_DECODE = """
import hashlib, logging, os, sys, time
from pathlib import Path
from xray_cls.data import images, ImageFolderDataModule
logging.basicConfig(level=logging.INFO, format="%(message)s")
real_read = images.read_image
def slow_read(*args):
    time.sleep(0.02)  # a decode long enough for the four processes to meet
    return real_read(*args)
images.read_image = slow_read
root, cache, go = sys.argv[1:]
Path(f"{go}.{os.getpid()}").touch()
while not Path(go).exists():
    time.sleep(0.005)
dm = ImageFolderDataModule(root=root, image_size=16, cache_dir=cache)
dm.setup()
print("DIGEST", hashlib.sha256(b"".join(dm.splits[n].images.numpy().tobytes() for n in ("train", "val", "test"))).hexdigest())
"""


def test_four_processes_started_together_decode_once_and_read_the_same(folder_copy: Path, tmp_path: Path) -> None:
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    runs = [
        subprocess.Popen([sys.executable, "-c", RACE_DECODE, str(folder_copy), str(cache), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(4)
    ]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("go.*"))) < 4 and time.monotonic() < deadline:  # every process imported
        time.sleep(0.05)
    go.touch()
    outputs = [run.communicate(timeout=240) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
    digests = {line for out, _ in outputs for line in out.splitlines() if line.startswith("DIGEST")}
    fresh = ImageFolderDataModule(root=str(folder_copy), image_size=16)
    fresh.setup()
    expected = hashlib.sha256(b"".join(fresh.splits[n].images.numpy().tobytes() for n in ("train", "val", "test")))
    assert digests == {f"DIGEST {expected.hexdigest()}"}
    decodes = [line for _, err in outputs for line in err.splitlines() if "into the cache" in line]
    assert len(decodes) == 2, decodes  # train and test, each decoded by one process
    assert len(list(cache.glob("*.npy"))) == 2 and not list(cache.glob(".*.tmp"))


def test_unusable_cache_dir_costs_a_warning_not_the_run(folder_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="xray_cls.data.folder"):
        dm = cached_module(folder_copy, blocker / "cache")
    assert re.search(rf"could not use the image cache {re.escape(str(blocker))}/cache/\S+\.npy: .*Not a directory.*decoding into memory", caplog.text)
    fresh = ImageFolderDataModule(root=str(folder_copy), image_size=16, seed=0)
    fresh.setup()
    assert torch.equal(dm.splits["train"].images, fresh.splits["train"].images)


def test_finished_entries_are_read_where_no_lock_can_be_taken(
    folder_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache shared read-only: the lock file cannot be opened for writing (here: it is a folder)."""
    first = cached_module(folder_copy, tmp_path / "cache")
    for lock in (tmp_path / "cache").glob("*.lock"):
        lock.unlink()
        lock.mkdir()
    forbid_decoding(monkeypatch)
    second = cached_module(folder_copy, tmp_path / "cache")
    for name in ("train", "val", "test"):
        assert torch.equal(first.splits[name].images, second.splits[name].images)


def test_aspect_jitter_scales_the_width_alone() -> None:
    """Rows survive it untouched (up to interpolation); columns are squeezed or stretched."""
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 32)
    by_row = ramp.view(1, 1, 32, 1).expand(8, 1, 32, 32)  # brightness varies with the row only
    by_column = ramp.view(1, 1, 1, 32).expand(8, 1, 32, 32)
    jitter = BatchAugment(Augment(aspect=0.5))
    assert torch.allclose(jitter(by_row), by_row, atol=1e-5)
    assert (jitter(by_column) - by_column).abs().amax() > 0.05


def test_aspect_jitter_setting_is_checked() -> None:
    with pytest.raises(UserInputError, match=r"data.aspect=-0.5 is not valid; expected a number in \[0, 10\)"):
        PneumoniaMNISTDataModule(aspect=-0.5)
