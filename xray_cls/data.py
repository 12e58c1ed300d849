"""Chest X-ray data: the bundled PneumoniaMNIST `.npz` or a Kermany-layout image folder.

Every split is decoded once into memory as a uint8 tensor (N, 1, H, W). Augmentation and
normalization run on whole batches after they reach the device (`on_after_batch_transfer`), so
they cost a few tensor ops per batch instead of a PIL pipeline per image.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from xray_cls.errors import UserInputError

log = logging.getLogger(__name__)

CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # label 0 and 1, as in MedMNIST
BUNDLED_NPZ = Path(__file__).parent / "bundled" / "pneumoniamnist.npz"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
VAL_FOLDER_NAMES = ("val", "valid", "validation")
SPLITS = ("train", "val", "test")


# --- augmentation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Factors with the meaning of Keras' RandomContrast, RandomTranslation and RandomZoom.

    contrast f: contrast scaled by a factor in [1-f, 1+f] around each image's mean.
    translate f: shifted by up to f of the image size, independently along each axis.
    zoom f: zoomed by a factor in [1-f, 1+f] (above 1 zooms out), aspect ratio kept.
    """

    contrast: float = 0.0
    translate: float = 0.0
    zoom: float = 0.0


AUGMENT_PRESETS = {
    "none": Augment(),
    "mild": Augment(contrast=0.1, translate=0.12, zoom=0.13),
    "strong": Augment(contrast=0.2, translate=0.23, zoom=0.27),
}


class BatchAugment(nn.Module):
    """Random contrast, translation and zoom, drawn per image, applied to a whole batch at once.

    torchvision's RandomAffine draws one set of parameters per call, i.e. per batch; this draws one
    per image and samples all of them with a single `grid_sample`. Borders are reflected, as Keras
    does by default.
    """

    def __init__(self, augment: Augment) -> None:
        super().__init__()
        self.augment = augment

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float (N, C, H, W) in [0, 1]; returns the same shape, still in [0, 1]."""
        a, n = self.augment, images.shape[0]
        if a.translate or a.zoom:
            scale = 1 + a.zoom * _uniform(n, images)
            # affine_grid spans [-1, 1], so a shift by a fraction f of the size is 2f.
            shift = 2 * a.translate * _uniform((n, 2), images)
            theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
            theta[:, 0, 0] = scale
            theta[:, 1, 1] = scale
            theta[:, :, 2] = shift
            grid = F.affine_grid(theta, list(images.shape), align_corners=False)
            images = F.grid_sample(images, grid, padding_mode="reflection", align_corners=False)
        if a.contrast:
            factor = (1 + a.contrast * _uniform(n, images)).view(n, 1, 1, 1)
            mean = images.mean(dim=(1, 2, 3), keepdim=True)
            images = ((images - mean) * factor + mean).clamp(0, 1)
        return images


def _uniform(shape: int | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Uniform in [-1, 1] on the device of `like`, from the global (seeded) generator."""
    return torch.rand(shape, device=like.device, dtype=like.dtype) * 2 - 1


def augment_preset(name: str) -> Augment:
    if name not in AUGMENT_PRESETS:
        raise UserInputError(
            f"data.aug={name!r} is not a known augmentation preset; expected one of "
            f"{', '.join(AUGMENT_PRESETS)}"
        )
    return AUGMENT_PRESETS[name]


# --- in-memory splits ---------------------------------------------------------------------------


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 1, H, W)
    labels: torch.Tensor  # int64 (N,)
    paths: list[Path] | None = None  # the image files, for splits read from a folder

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Split:
        paths = [self.paths[i] for i in index.tolist()] if self.paths is not None else None
        return Split(self.images[index], self.labels[index], paths)

    def concat(self, other: Split) -> Split:
        paths = self.paths + other.paths if self.paths is not None and other.paths is not None else None
        return Split(torch.cat([self.images, other.images]), torch.cat([self.labels, other.labels]), paths)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(CLASS_NAMES)).tolist()


class SplitDataset(Dataset):
    """A Split served a batch at a time: `__getitems__` indexes the tensors once per batch."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.images[i], self.split.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.split.images[index], self.split.labels[index]


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


def _batch_as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch  # __getitems__ already returns stacked tensors


# Kermany file names name the patient: person1946_bacteria_4875.jpeg is patient person1946,
# IM-0115-0001.jpeg is IM-0115 and NORMAL2-IM-1427-0001.jpeg is NORMAL2-IM-1427.
KERMANY_PATIENT = re.compile(r"^(person\d+(?=_)|(?:NORMAL2-)?IM-\d+(?=-))", re.IGNORECASE)


def patient_id(path: Path) -> str | None:
    """The patient a Kermany image file belongs to, or None when its name follows no known pattern."""
    match = KERMANY_PATIENT.match(path.name)
    return match.group(1) if match else None


def patient_split(
    labels: torch.Tensor, patients: list[str], fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): `fraction` of each class's patients in val, every image of a patient
    on the same side, the same for the same seed. A patient counts for the class of most of its
    images; one group per image makes this an image-level stratified split."""
    members: dict[str, list[int]] = {}
    for index, patient in enumerate(patients):
        members.setdefault(patient, []).append(index)
    generator = torch.Generator().manual_seed(seed)
    val: list[int] = []
    for label in labels.unique().tolist():
        groups = [g for g, index in members.items() if labels[index].mode().values.item() == label]
        order = torch.randperm(len(groups), generator=generator)
        n_val = max(1, round(fraction * len(groups)))
        val += [i for k in order[:n_val].tolist() for i in members[groups[k]]]
    in_val = torch.zeros(len(labels), dtype=torch.bool)
    in_val[val] = True
    return torch.nonzero(~in_val).flatten(), torch.nonzero(in_val).flatten()


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 (N, C, H, W) to (N, C, size, size)."""
    if images.shape[-2:] == (size, size):
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)


# --- readers ------------------------------------------------------------------------------------


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
        splits[name] = Split(images.unsqueeze(1).contiguous(), labels)
    return splits


def find_subfolder(parent: Path, names: tuple[str, ...]) -> Path | None:
    """The subfolder of `parent` whose name is one of `names`, ignoring case."""
    wanted = {n.lower() for n in names}
    for child in sorted(parent.iterdir()):
        if child.is_dir() and child.name.lower() in wanted:
            return child
    return None


def list_images(split_dir: Path) -> tuple[list[Path], list[int], int]:
    """(paths, labels, number of ignored files) below split_dir/{NORMAL,PNEUMONIA}."""
    paths, labels, ignored = [], [], 0
    for label, class_name in enumerate(CLASS_NAMES):
        class_dir = find_subfolder(split_dir, (class_name,))
        if class_dir is None:
            found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
            raise UserInputError(
                f"{split_dir} has no {class_name} folder; expected the class folders "
                f"{' and '.join(CLASS_NAMES)} (any case), found {found or 'no folders'}"
            )
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        images = [p for p in files if is_image_file(p)]
        if not images:
            raise UserInputError(
                f"{class_dir} holds no images; expected {', '.join(sorted(IMAGE_SUFFIXES))} files"
            )
        ignored += len(files) - len(images)
        paths += images
        labels += [label] * len(images)
    return paths, labels, ignored


def is_image_file(path: Path) -> bool:
    """An image by its suffix; hidden files (.DS_Store, macOS ._* AppleDouble files) never are."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def open_gray(path: Path, draft_size: int) -> Any:
    """An image file as an 8-bit grayscale PIL image, at least about draft_size on each side."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("L", (draft_size, draft_size))  # JPEG: let the decoder downscale by up to 8x for free
            image.load()
            return to_grayscale(image)
    except Image.DecompressionBombError as err:  # PIL refuses images over ~179 megapixels
        raise UserInputError(f"{path} is too large to decode safely ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise UserInputError(f"{path} is not a readable image ({err})") from None


def read_image(path: Path, size: int) -> np.ndarray:
    """One image file as a uint8 (size, size) grayscale array."""
    from PIL import Image

    return np.asarray(open_gray(path, size).resize((size, size), Image.Resampling.BILINEAR))


def to_grayscale(image: Any) -> Any:
    """8-bit grayscale from any PIL mode; 16- and 32-bit images are scaled, not clipped."""
    from PIL import Image

    if image.mode.startswith("I"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 255.0 if pixels.max() <= 255 else 65535.0
        return Image.fromarray(np.clip(pixels / top * 255, 0, 255).round().astype(np.uint8))
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        span = max(pixels.max() - pixels.min(), 1e-12)
        return Image.fromarray(((pixels - pixels.min()) / span * 255).round().astype(np.uint8))
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image.convert("L")


def read_images(paths: list[Path], size: int) -> list[np.ndarray | UserInputError]:
    """Each file as `read_image` gives it, or the error that says why it cannot be read. PIL
    releases the GIL while decoding, so threads use every core."""

    def attempt(path: Path) -> np.ndarray | UserInputError:
        try:
            return read_image(path, size)
        except UserInputError as err:
            return err

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(attempt, paths))


def decode_images(paths: list[Path], size: int) -> np.ndarray:
    """uint8 (N, size, size); the first unreadable file stops it."""
    images = read_images(paths, size)
    for image in images:
        if isinstance(image, UserInputError):
            raise image
    return np.stack(images)


# The decoded, resized images of a split folder are cached on disk, keyed by every file's path,
# size and modification time and by the image size: any change to them means a new key.
CACHE_FORMAT = 1


def cache_path(cache_dir: Path, split_dir: Path, paths: list[Path], labels: list[int], size: int) -> Path:
    folder_id = hashlib.sha256(str(split_dir.resolve()).encode()).hexdigest()[:16]
    content = hashlib.sha256(f"{CACHE_FORMAT}\n{size}\n".encode())
    for path, label in zip(paths, labels):
        stat = path.stat()
        content.update(f"{path}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return cache_dir / f"{folder_id}-{size}-{content.hexdigest()[:24]}.pt"


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
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"images": split.images, "labels": split.labels}, tmp)
    os.replace(tmp, path)


def read_folder_split(split_dir: Path, size: int, cache_dir: Path | None = None) -> Split:
    paths, labels, ignored = list_images(split_dir)
    if ignored:
        log.info("%s: ignored %d file(s) that are not images", split_dir, ignored)
    cache = cache_path(cache_dir, split_dir, paths, labels, size) if cache_dir else None
    if cache is not None and (split := load_cached_split(cache, labels, size)) is not None:
        log.info("%s: %d images from the cache %s", split_dir, len(paths), cache)
        split.paths = paths
        return split
    split = Split(torch.from_numpy(decode_images(paths, size)).unsqueeze(1), torch.tensor(labels), paths)
    if cache is not None:
        try:
            save_cached_split(cache, split)
        except OSError as err:  # a read-only or full disk costs speed, not the run
            log.warning("could not write the image cache %s: %s", cache, err)
    return split


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 pixels -> float, standardized with the train split's statistics."""
    return (images.float() / 255 - mean) / std


def pixel_mean_std(images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of uint8 pixels scaled to [0, 1], from a histogram, so that a
    large split is never copied to float."""
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum() / counts.sum()
    std = ((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt()
    return mean.item(), max(std.item(), 1e-6)


# --- the DataModule -----------------------------------------------------------------------------


class XrayDataModule(L.LightningDataModule):
    """Serves train/val/test splits; subclasses only say how to read them (`read_splits`)."""

    def __init__(
        self,
        image_size: int | None = None,
        batch_size: int = 32,
        aug: str = "none",
        num_workers: int = 0,
        pin_memory: bool = False,
        on_device: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if image_size is not None and (
            isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0
        ):
            raise UserInputError(f"data.image_size={image_size!r} is not valid; expected a positive integer")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise UserInputError(f"data.batch_size={batch_size!r} is not valid; expected a positive integer")
        self.requested_size = image_size
        self.batch_size = batch_size
        self.aug = aug
        self.augment = BatchAugment(augment_preset(aug))
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.on_device = on_device
        self.seed = seed
        self.splits: dict[str, Split] = {}
        self.mean = 0.0
        self.std = 1.0
        self.test_split = "test"  # the split test_dataloader serves (`evaluate split=...`)
        self.only_split: str | None = None  # evaluate reads just the split it evaluates
        self.recorded_val: list[str] | None = None  # a run's derived val split, to evaluate on again

    def read_splits(self) -> dict[str, Split]:
        raise NotImplementedError

    def evaluate_split(self, split: str, recorded_val: list[str] | None = None) -> None:
        """Serve `split` as the test split, reading only what it needs; a val split derived from
        train is rebuilt from `recorded_val` (the run's own, see `state_dict`) when given."""
        if split not in SPLITS:
            raise UserInputError(f"split={split!r} is not a split of this data; expected one of {', '.join(SPLITS)}")
        self.test_split = self.only_split = split
        self.recorded_val = recorded_val

    def setup(self, stage: str | None = None) -> None:
        if self.splits:  # idempotent: the CLI reads the data once to size the network
            return
        self.splits = self.read_splits()
        for name, split in self.splits.items():
            log.info("%s split: %d images, %s = %s", name, len(split), "/".join(CLASS_NAMES), split.class_counts())
        if "train" in self.splits:  # evaluate reads no train split: the checkpoint has the statistics
            self.mean, self.std = pixel_mean_std(self.splits["train"].images)
            log.info("normalization from the train split: mean %.4f, std %.4f", self.mean, self.std)

    @property
    def image_size(self) -> int:
        return next(iter(self.splits.values())).images.shape[-1]

    @property
    def in_channels(self) -> int:
        return next(iter(self.splits.values())).images.shape[1]

    def split_rows(self) -> list[dict[str, Any]]:
        """Which image went to which split (splits.csv): path, split, label, patient."""
        rows = []
        for name, split in self.splits.items():
            for i, label in enumerate(split.labels.tolist()):
                path = self.source_name(split, name, i)
                patient = patient_id(split.paths[i]) if split.paths is not None else None
                rows.append({"path": path, "split": name, "label": CLASS_NAMES[label], "patient": patient or ""})
        return rows

    def source_name(self, split: Split, name: str, index: int) -> str:
        return f"{name}_images[{index}]"  # the .npz key and row

    def preprocess(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        """uint8 images -> normalized float, augmented when `train`."""
        if not train:
            return normalize(images, self.mean, self.std)
        return (self.augment(images.float() / 255) - self.mean) / self.std

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        return self.preprocess(images, train=training), labels

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if name not in self.splits:
            raise UserInputError(f"split={name!r} is not a split of this data; expected one of {', '.join(self.splits)}")
        split, sampler = self.splits[name], None
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if self.on_device and device.type == "cuda":
            # The splits are small: copied to the GPU once, every batch is then indexed there.
            split = Split(split.images.to(device), split.labels.to(device))
            self.splits[name] = split
        dataset = SplitDataset(split)
        if shuffle and (trainer is None or trainer.world_size == 1):
            sampler = EpochShuffle(len(split), self.seed, self.batch_size, self._batches_done)
        elif not shuffle and trainer is not None and trainer.world_size > 1:
            # Lightning's default sampler pads the last batch with repeats; evaluation must count
            # every image once, so each process takes a disjoint share instead.
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,  # under DDP Lightning swaps in its DistributedSampler
            sampler=sampler,
            collate_fn=_batch_as_is,
            # Each new iterator draws a worker seed from its generator: with the global one, that
            # draw would shift augmentation and dropout after a resume.
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=0 if split.images.is_cuda else self.num_workers,
            pin_memory=self.pin_memory and not split.images.is_cuda,
            persistent_workers=self.num_workers > 0 and not split.images.is_cuda,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, shuffle=False)

    def _batches_done(self) -> int:
        """Batches of the current epoch already trained: more than 0 only when resuming mid-epoch."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready if self.trainer else 0

    def preprocessing(self) -> dict[str, Any]:
        """What a trained model needs to prepare new images as it was trained (kept in its checkpoint)."""
        return {
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "mean": self.mean,
            "std": self.std,
            "class_names": list(CLASS_NAMES),
        }

    def use_preprocessing(self, preprocessing: dict[str, Any]) -> None:
        """Normalize with a trained model's statistics instead of this data's own."""
        self.mean, self.std = preprocessing["mean"], preprocessing["std"]


class PneumoniaMNISTDataModule(XrayDataModule):
    """MedMNIST `.npz` (the bundled 28 px PneumoniaMNIST by default) with its official splits."""

    def __init__(self, path: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = Path(path) if path else BUNDLED_NPZ

    def read_splits(self) -> dict[str, Split]:
        splits = read_npz(self.path)
        if self.requested_size is not None:
            splits = {k: Split(resize_uint8(s.images, self.requested_size), s.labels) for k, s in splits.items()}
        return splits


class ImageFolderDataModule(XrayDataModule):
    """Kermany/Kaggle layout: root/{train,test[,val]}/{NORMAL,PNEUMONIA}/*.{jpeg,jpg,png}.

    A missing val folder, or one with fewer than `min_val_images` images (Kaggle's has 16), is
    replaced by `val_fraction` of train's patients per class (its images, if any, join train
    first), so that no patient has images on both sides.
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 64,
        val_fraction: float = 0.1,
        min_val_images: int = 100,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if image_size is None:
            raise UserInputError("data.image_size=None is not valid; expected a positive integer")
        super().__init__(image_size=image_size, **kwargs)
        if not root:
            raise UserInputError("data.root is not set; expected data.root=/path/to/chest_xray")
        if not 0 < val_fraction < 1:
            raise UserInputError(f"data.val_fraction={val_fraction!r} is not valid; expected a number in (0, 1)")
        self.root = Path(root).expanduser()
        self.val_fraction = val_fraction
        self.min_val_images = min_val_images
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.derived_val: list[str] | None = None  # the val split drawn from train, as paths relative to root

    def read_splits(self) -> dict[str, Split]:
        if not self.root.is_dir():
            raise UserInputError(
                f"data.root: {self.root} does not exist or is not a folder; expected a folder with "
                "train/ and test/ (and optionally val/), each holding NORMAL/ and PNEUMONIA/"
            )
        if self.only_split == "test":
            return {"test": self._read(self._test_folder())}
        splits = self._train_and_val(self._read(self._folder("train")))
        if self.only_split is None:
            splits["test"] = self._read(self._folder("test"))
        return splits

    def _read(self, folder: Path) -> Split:
        return read_folder_split(folder, self.requested_size, self.cache_dir)

    def _folder(self, name: str) -> Path:
        folder = find_subfolder(self.root, (name,))
        if folder is None:
            found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise UserInputError(
                f"data.root: {self.root} has no {name}/ folder; expected train/ and test/ "
                f"(and optionally val/), found {found or 'no folders'}"
            )
        return folder

    def _test_folder(self) -> Path:
        """root/test, or root itself when it holds the class folders (a folder of test images alone)."""
        if find_subfolder(self.root, ("test",)) is None and all(find_subfolder(self.root, (c,)) for c in CLASS_NAMES):
            return self.root
        return self._folder("test")

    def _train_and_val(self, train: Split) -> dict[str, Split]:
        val_dir = find_subfolder(self.root, VAL_FOLDER_NAMES)
        val = self._read(val_dir) if val_dir is not None else None
        if val is not None and len(val) >= self.min_val_images:
            log_patient_overlap(train, val)
            return {"train": train, "val": val}
        if val is not None:
            log.info("%s has only %d images (< data.min_val_images=%d): merged into train", val_dir, len(val), self.min_val_images)
            train = train.concat(val)
        if self.recorded_val is not None:
            train_index, val_index = self._recorded_val_index(train)
        else:
            patients = patient_groups(train.paths)
            unmatched = sum(p.startswith(ONE_IMAGE_GROUP) for p in patients)
            if unmatched:
                log.info("%d of %d image names name no patient (Kermany patterns): one group per image", unmatched, len(patients))
            train_index, val_index = patient_split(train.labels, patients, self.val_fraction, self.seed)
            log.info("val split: %.0f%% of train's patients per class (seed %d)", 100 * self.val_fraction, self.seed)
        splits = {"train": train.subset(train_index), "val": train.subset(val_index)}
        self.derived_val = [self.source_name(splits["val"], "val", i) for i in range(len(splits["val"]))]
        log_patient_overlap(splits["train"], splits["val"])
        return splits

    def _recorded_val_index(self, train: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """The run's own val split, by the paths its checkpoint recorded."""
        recorded = set(self.recorded_val or [])
        in_val = torch.tensor([self.source_name(train, "train", i) in recorded for i in range(len(train))])
        found = int(in_val.sum())
        if found == 0:
            raise UserInputError(
                f"data.root: {self.root} holds none of the {len(recorded)} val images the checkpoint's run "
                "recorded; expected the folder the run was trained on (or evaluate split=test)"
            )
        if found < len(recorded):
            log.warning("%d of the run's %d recorded val images are missing from %s", len(recorded) - found, len(recorded), self.root)
        log.info("val split: the %d images the run recorded", found)
        return torch.nonzero(~in_val).flatten(), torch.nonzero(in_val).flatten()

    def source_name(self, split: Split, name: str, index: int) -> str:
        path = split.paths[index]  # type: ignore[index]  # folder splits always carry their paths
        return path.relative_to(self.root).as_posix()

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the val split drawn from train, so `evaluate split=val` rebuilds it."""
        return {"derived_val": self.derived_val} if self.derived_val is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("derived_val") != self.derived_val:
            log.warning("the val split differs from the one the checkpoint recorded (the folder or the seed changed)")


ONE_IMAGE_GROUP = "image:"


def patient_groups(paths: list[Path] | None) -> list[str]:
    """The patient of each image; an image whose name names no patient is a group of its own."""
    return [patient_id(p) or f"{ONE_IMAGE_GROUP}{p}" for p in paths or []]


def log_patient_overlap(train: Split, val: Split) -> None:
    """val has N images of M patients, and how many of them are in train too (0 for a derived split)."""
    train_patients = set(patient_groups(train.paths))
    val_patients = set(patient_groups(val.paths))
    shared = len(train_patients & val_patients)
    (log.warning if shared else log.info)(
        "val has %d images of %d patients, and %d patients are shared with train", len(val), len(val_patients), shared
    )
