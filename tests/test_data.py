"""Data: the bundled .npz, the Kermany folder layout, val split, normalization, augmentation, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import FOLDER_LAYOUT, image_count, make_kermany_folder
from PIL import Image

from xray_cls.data import (
    AUGMENT_PRESETS,
    BUNDLED_NPZ,
    Augment,
    BatchAugment,
    ImageFolderDataModule,
    PneumoniaMNISTDataModule,
    read_npz,
    patient_split,
)
from xray_cls.errors import UserInputError

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


class BatchProbe(L.LightningModule):
    """Records the batches the Trainer hands to each stage."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        self.seen["train"].append(batch[0])
        return self.layer(batch[0].mean().view(1, 1)).sum()

    def validation_step(self, batch, batch_idx):  # noqa: ANN001
        self.seen["val"].append(batch[0])

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


# --- bad input ----------------------------------------------------------------------------------


def test_missing_root_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserInputError, match=f"data.root: {missing} does not exist"):
        ImageFolderDataModule(root=str(missing)).setup()


def test_unset_root_says_how_to_set_it() -> None:
    with pytest.raises(UserInputError, match="data.root is not set"):
        ImageFolderDataModule(root=None)


def test_root_without_test_folder_is_named(kermany_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(kermany_root / "train", root / "train")
    with pytest.raises(UserInputError, match=r"has no test/ folder.*found \['train'\]"):
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


def cached_module(root: Path, cache: Path, size: int = 16) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(root=str(root), image_size=size, cache_dir=str(cache), seed=0)
    dm.setup()
    return dm


@pytest.fixture()
def folder_copy(kermany_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(kermany_root, tmp_path / "data"))


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(paths, size):  # noqa: ANN001, ANN202
        raise AssertionError(f"decoded {len(paths)} images although the cache holds them")

    monkeypatch.setattr("xray_cls.data.decode_images", fail)


def test_second_run_reads_the_cache(folder_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = cached_module(folder_copy, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # train and test
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
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # the stale entry was replaced


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


def test_other_image_size_gets_its_own_entry(folder_copy: Path, tmp_path: Path) -> None:
    cached_module(folder_copy, tmp_path / "cache", size=16)
    bigger = cached_module(folder_copy, tmp_path / "cache", size=24)
    assert bigger.splits["test"].images.shape[-2:] == (24, 24)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape"])
def test_corrupt_cache_is_rebuilt_not_trusted(folder_copy: Path, tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    first = cached_module(folder_copy, cache)
    for entry in cache.glob("*.pt"):
        if damage == "garbage":
            entry.write_bytes(b"not a torch file")
        elif damage == "truncated":
            entry.write_bytes(entry.read_bytes()[:200])
        else:
            data = torch.load(entry, weights_only=True)
            torch.save({"images": data["images"][:, :, :8, :8].contiguous(), "labels": data["labels"]}, entry)
    rebuilt = cached_module(folder_copy, cache)
    for name in ("train", "test"):
        assert torch.equal(first.splits[name].images, rebuilt.splits[name].images)
    for entry in cache.glob("*.pt"):  # and the rebuilt entries are sound again
        assert torch.load(entry, weights_only=True)["images"].shape[-1] == 16
