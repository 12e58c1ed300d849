"""The LightningDataModule every dataset shares (`XrayDataModule`): its splits checked, their
loaders, normalization, and the evaluation path; subclasses say how to read the splits.

Every split is decoded once into a uint8 tensor (N, 1, H, W) (`splits.Split`): in memory, or
memory-mapped from the on-disk cache of an image folder (`cache.py`), so that a folder larger than
memory is served from the page cache. A batch is gathered with one indexing op. Augmentation and
normalization run on whole batches after they reach the device (`on_after_batch_transfer`), so
they cost a few tensor ops per batch instead of a PIL pipeline per image.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from xray_cls.core.errors import UserInputError
from xray_cls.core.legacy_names import forwarding
from xray_cls.core.options import check_choice, check_number
from xray_cls.core.task import PNEUMONIA, make_task
from xray_cls.data.augment import BatchAugment, augment_preset, check_mixup, mixup
from xray_cls.data.images import check_geometry
from xray_cls.data.options import MAX_IMAGE_SIZE, SPLITS
from xray_cls.data.splits import EpochShuffle, Split, SplitDataset, batch_as_is, fits_on_device, normalize, pixel_mean_std

log = logging.getLogger(__name__)


CLASS_NAMES = PNEUMONIA.classes  # task=pneumonia's: label 0 and 1, as in MedMNIST


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` reads for a trained model: one split, the splits its run drew from train
    (paths by split, from the checkpoint), and its preprocessing (the train split's mean and std)."""

    split: str
    preprocessing: dict[str, Any]
    recorded: dict[str, list[str]] = field(default_factory=dict)


class XrayDataModule(L.LightningDataModule):
    """Serves train/val/test splits; subclasses only say how to read them (`read_splits`)."""

    def __init__(
        self,
        image_size: int | None = None,
        batch_size: int = 32,
        aug: str = "none",
        aspect: float = 0.0,
        mixup: float = 0.0,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_device: bool = True,
        seed: int = 0,
        geometry: str = "crop",
        task: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.task = make_task(task)
        check_number("data.image_size", image_size, 1, MAX_IMAGE_SIZE, integer=True, none=True)
        check_number("data.batch_size", batch_size, 1, integer=True)
        self.geometry = check_geometry(geometry, "data.geometry")
        self.requested_size = image_size
        self.batch_size = batch_size
        self.aug = aug
        self.augment = BatchAugment(augment_preset(aug, aspect))
        self.mixup = check_mixup(mixup)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.on_device = on_device
        self.seed = seed
        self.splits: dict[str, Split] = {}
        self.mean = 0.0
        self.std = 1.0
        self.normalization = "train"
        self.test_split = "test"  # the split test_dataloader serves (`evaluate split=...`)
        self.only_split: str | None = None  # evaluate reads just the split it evaluates
        self.recorded: dict[str, list[str]] = {}  # a run's splits drawn from train, to evaluate on again

    def read_splits(self) -> dict[str, Split]:
        raise NotImplementedError

    def setup_evaluation(self, evaluation: Evaluation) -> None:
        """Read the data as `evaluate` needs it for a trained model: only the split it evaluates
        (served as the test split; splits the run drew from train rebuilt from its record), then
        normalized with the model's own statistics instead of this data's."""
        self.test_split = self.only_split = check_choice("split", evaluation.split, SPLITS, "a split of this data")
        self.recorded = dict(evaluation.recorded)
        self.setup("test")
        self.mean, self.std = evaluation.preprocessing["mean"], evaluation.preprocessing["std"]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:  # idempotent: the CLI reads the data once to size the network
            return
        self.splits = self.read_splits()
        for name, split in self.splits.items():
            log.info("%s split: %d images, %s = %s", name, len(split), "/".join(self.class_names),
                     split.class_counts(len(self.class_names)))
        self.check_splits()
        if "train" in self.splits:  # evaluate reads no train split: the checkpoint has the statistics
            self.mean, self.std = pixel_mean_std(self.splits["train"])
            log.info("normalization from the train split: mean %.4f, std %.4f", self.mean, self.std)

    def check_splits(self) -> None:
        """Every split holds images, and train holds every class: else a run would fail (or learn
        nothing of a class) only after it started."""
        for name, split in self.splits.items():
            if len(split) == 0:
                raise UserInputError(f"{self.source_text()}: the {name} split has no images; expected images in train, val and test")
        if "train" in self.splits:
            counts = self.splits["train"].class_counts(len(self.class_names))
            absent = [n for n, count in zip(self.class_names, counts) if count == 0]
            if absent:
                raise UserInputError(f"{self.source_text()}: the train split has no image of {', '.join(absent)} "
                                     f"({'/'.join(self.class_names)} = {counts}); expected images of every class")

    def source_text(self) -> str:
        """The data as an option and its value, for the errors that name it."""
        return "the data"

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.task.classes

    @property
    def image_size(self) -> int:
        return next(iter(self.splits.values())).source.shape[-1]

    @property
    def in_channels(self) -> int:
        return next(iter(self.splits.values())).source.shape[1]

    def split_rows(self) -> list[dict[str, Any]]:
        """Which image went to which split (splits.csv): path, split, label, patient."""
        rows = []
        for name, split in self.splits.items():
            for i, label in enumerate(split.labels.tolist()):
                path, patient = self.source_name(split, name, i), self.patient_name(split, i)
                rows.append({"path": path, "split": name, "label": self.class_names[label], "patient": patient})
        return rows

    def source_name(self, split: Split, name: str, index: int) -> str:
        return f"{name}_images[{index}]"  # the .npz key and row

    def patient_name(self, split: Split, index: int) -> str:
        return ""  # datasets that name no patients

    def preprocess(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        """uint8 images -> normalized float, augmented when `train`."""
        if not train:
            return normalize(images, self.mean, self.std)
        return (self.augment(images.float() / 255) - self.mean) / self.std

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        images = self.preprocess(images, train=training)
        if training and self.mixup:
            images, labels = mixup(images, labels, self.mixup, len(self.class_names))
        return images, labels

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if name not in self.splits:
            raise UserInputError(f"split={name!r} is not a split of this data; expected one of {', '.join(self.splits)}")
        split, sampler = self.splits[name], None
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if self.on_device and device.type == "cuda" and fits_on_device(name, split, device):
            # Small splits: copied to the GPU once (a subset only its own rows), every batch is then indexed there.
            split = Split(split.images.to(device), split.labels.to(device), split.paths)
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
            collate_fn=batch_as_is,
            # Each new iterator draws a worker seed from its generator: with the global one, that
            # draw would shift augmentation and dropout after a resume.
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=0 if split.source.is_cuda else self.num_workers,
            pin_memory=self.pin_memory and not split.source.is_cuda,
            persistent_workers=self.num_workers > 0 and not split.source.is_cuda,
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

    def use_normalization(self, name: str, mean: float, std: float) -> None:
        """Normalize with given statistics instead of the train split's (`imagenet` for pretrained weights)."""
        self.normalization, self.mean, self.std = name, mean, std
        log.info("normalization for %s weights: mean %.4f, std %.4f", name, mean, std)

    def preprocessing(self) -> dict[str, Any]:
        """What a trained model needs to prepare new images as it was trained (kept in its checkpoint)."""
        return {
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "mean": self.mean,
            "std": self.std,
            "class_names": list(self.class_names),
            "task": self.task.record(),
            "geometry": self.geometry,
            "normalization": self.normalization,  # whose mean and std: the train split's, or imagenet's
        }


__getattr__ = forwarding(__name__)  # the names that moved out of this module, from where they are now
