"""Kermany/Kaggle image folders: root/{train,test[,val]}/{NORMAL,PNEUMONIA}/*, with a val split
drawn from train by patient where the folder has no usable one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from xray_cls.core.errors import UserInputError
from xray_cls.core.files import path_text
from xray_cls.core.legacy_names import forwarding
from xray_cls.core.options import check_number
from xray_cls.core.task import PNEUMONIA, Task, make_task
from xray_cls.data.cache import cache_path, cached_images
from xray_cls.data.datamodule import XrayDataModule
from xray_cls.data.images import IMAGE_SUFFIXES, decode_images, is_image_file
from xray_cls.data.options import MAX_IMAGE_SIZE
from xray_cls.data.patients import ONE_IMAGE_GROUP, log_patient_overlap, patient_folds, patient_groups, patient_id, patient_split
from xray_cls.data.splits import Split

log = logging.getLogger(__name__)


VAL_FOLDER_NAMES = ("val", "valid", "validation")


def find_subfolder(parent: Path, names: tuple[str, ...]) -> Path | None:
    """The subfolder of `parent` whose name is one of `names`, ignoring case."""
    wanted = {n.lower() for n in names}
    for child in sorted(parent.iterdir()):
        if child.is_dir() and child.name.lower() in wanted:
            return child
    return None


def list_images(split_dir: Path, task: Task = PNEUMONIA) -> tuple[list[Path], list[int], int]:
    """(paths, labels, number of ignored files) below the task's class folders of split_dir
    (NORMAL/ and PNEUMONIA/ for task=pneumonia), each image labeled by its folder or, for a task
    read from file names, by its name."""
    paths, labels, ignored = [], [], 0
    for folder in task.class_folders:
        class_dir = find_subfolder(split_dir, (folder,))
        if class_dir is None:
            found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
            raise UserInputError(
                f"{split_dir} has no {folder} folder; expected the class folders "
                f"{' and '.join(task.class_folders)} (any case), found {found or 'no folders'}"
            )
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        images = [p for p in files if is_image_file(p)]
        if not images:
            raise UserInputError(
                f"{class_dir} holds no images; expected {', '.join(sorted(IMAGE_SUFFIXES))} files"
            )
        ignored += len(files) - len(images)
        label = task.folder_label(folder)
        found_labels = [label] * len(images) if label is not None else labels_from_names(images, task)
        paths += [p for p, found_label in zip(images, found_labels) if found_label is not None]
        labels += [found_label for found_label in found_labels if found_label is not None]
    return paths, labels, ignored


def labels_from_names(images: list[Path], task: Task) -> list[int | None]:
    """Each image's class by its file name; a name that tells none is refused, or skipped and
    counted, as `task.unknown` says."""
    labels = [task.label_from_name(p) for p in images]
    unknown = [p for p, label in zip(images, labels) if label is None]
    words = " or ".join(f"{word!r} ({name})" for name, word in task.file_name_words.items())
    if unknown and task.unknown == "refuse":
        raise UserInputError(
            f"{path_text(unknown[0])}: its name says no class of task={task.name} ({len(unknown)} such file(s)); "
            f"expected one of the words {words}, or task.unknown=skip"
        )
    if unknown:
        log.warning("%s: skipped %d file(s) whose names hold neither %s", path_text(unknown[0].parent), len(unknown), words)
    return labels


def read_folder_split(
    split_dirs: list[Path], size: int, cache_dir: Path | None = None, geometry: str = "crop", task: Task = PNEUMONIA
) -> Split:
    """The images below `split_dirs` (one split folder, or train and a small val folder that joins
    it) as one split: memory-mapped from the cache entry in `cache_dir`, decoding into it first if
    needed, or decoded into memory without a cache."""
    paths: list[Path] = []
    labels: list[int] = []
    for split_dir in split_dirs:
        found, found_labels, ignored = list_images(split_dir, task)
        if ignored:
            log.info("%s: ignored %d file(s) that are not images", split_dir, ignored)
        paths += found
        labels += found_labels
    return decoded_split(paths, labels, size, cache_dir, geometry, split_dirs)


def decoded_split(paths: list[Path], labels: list[int], size: int, cache_dir: Path | None, geometry: str,
                  sources: list[Path]) -> Split:
    """`paths` decoded as one split: memory-mapped from the cache entry in `cache_dir` (keyed by
    `sources`, the folders or table they came from), decoding into it first if needed, or decoded
    into memory without a cache."""
    source = " + ".join(str(d) for d in sources)
    images = None
    if cache_dir is not None:
        cache = cache_path(cache_dir, sources, paths, labels, size, geometry)
        try:
            images = cached_images(cache, paths, size, geometry, source)
        except OSError as err:  # a read-only or full disk costs memory and speed, not the run
            log.warning("could not use the image cache %s: %s; decoding into memory", cache, err)
    if images is None:
        images = torch.from_numpy(decode_images(paths, size, geometry, source))
    return Split(images, torch.tensor(labels), paths)


class ImageFolderDataModule(XrayDataModule):
    """Kermany/Kaggle layout: root/{train,test[,val]}/{NORMAL,PNEUMONIA}/*.{jpeg,jpg,png,dcm}.

    A missing val folder, or one with fewer than `min_val_images` images (Kaggle's has 16), is
    replaced by `val_fraction` of train's patients per class (its images, if any, join train
    first), so that no patient has images on both sides. A root without test/ gets a development
    test split the same way: `test_fraction` of train's patients, drawn with `test_seed` before
    val, so that every run seed is tested on the same patients.
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 64,
        val_fraction: float = 0.1,
        min_val_images: int = 100,
        test_fraction: float = 0.1,
        test_seed: int = 0,
        cache_dir: str | None = None,
        classes: list[str] | None = None,
        folds: int | None = None,
        fold: int = 0,
        fold_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        check_number("data.image_size", image_size, 1, MAX_IMAGE_SIZE, integer=True)  # a folder has no size of its own
        super().__init__(image_size=image_size, **kwargs)
        if classes is not None:
            self.task = make_task(self.task.record(), classes)
        if not root:
            raise UserInputError("data.root is not set; expected data.root=/path/to/chest_xray")
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            check_number(f"data.{name}", fraction, 0, 1, low_open=True, high_open=True)
        self.root = Path(root).expanduser()
        self.val_fraction = val_fraction
        self.min_val_images = min_val_images
        self.test_fraction = test_fraction
        self.test_seed = test_seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        check_number("data.folds", folds, 2, 100, integer=True, none=True)
        if folds is not None:
            check_number("data.fold", fold, 0, folds - 1, integer=True, expected=f"an integer from 0 to {folds - 1} (data.folds={folds})")
        check_number("data.fold_seed", fold_seed, integer=True)
        self.folds, self.fold, self.fold_seed = folds, fold, fold_seed
        self.fold_of: dict[str, int] = {}  # with data.folds: each train and val image's fold, by path
        self.derived: dict[str, list[str]] = {}  # splits drawn from train, as paths relative to root

    def source_text(self) -> str:
        return f"data.root: {path_text(self.root)}"

    def read_splits(self) -> dict[str, Split]:
        if not self.root.is_dir():
            raise UserInputError(
                f"data.root: {self.root} does not exist or is not a folder; expected a folder with "
                f"train/ (and optionally test/ and val/), each holding {self._class_folders_text()}"
            )
        test_dir = self._test_folder()
        if self.only_split == "test" and test_dir is not None:
            return {"test": self._read(test_dir)}
        splits = self._drawn_splits(draw_test=test_dir is None)
        if self.only_split is None and test_dir is not None:
            splits["test"] = self._read(test_dir)
        return splits

    def _class_folders_text(self) -> str:
        return " and ".join(f"{folder}/" for folder in self.task.class_folders)

    def _read(self, *folders: Path) -> Split:
        return read_folder_split(list(folders), self.requested_size, self.cache_dir, self.geometry, self.task)

    def _test_folder(self) -> Path | None:
        """root/test; root itself when it holds the class folders (a folder of test images alone);
        None when there is only train/ (the test split is then drawn from it)."""
        test_dir = find_subfolder(self.root, ("test",))
        if test_dir is None and find_subfolder(self.root, ("train",)) is None:
            if all(find_subfolder(self.root, (c,)) for c in self.task.class_folders):
                return self.root
            found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise UserInputError(
                f"data.root: {self.root} has no train/ or test/ folder; expected train/ (and optionally "
                f"test/ and val/), found {found or 'no folders'}"
            )
        return test_dir

    def _drawn_splits(self, draw_test: bool) -> dict[str, Split]:
        """train and val, and test when `draw_test`: folders where they are usable, the rest drawn
        from train by patient."""
        train_dir, val_dir = find_subfolder(self.root, ("train",)), find_subfolder(self.root, VAL_FOLDER_NAMES)
        if train_dir is None:
            raise UserInputError(f"data.root: {self.root} has no train/ folder; expected train/ with {self._class_folders_text()}")
        val_count = len(list_images(val_dir, self.task)[0]) if val_dir is not None else 0
        val = None
        if val_dir is not None and val_count >= self.min_val_images and not self.folds:  # folds replace val/
            train, val = self._read(train_dir), self._read(val_dir)
        else:
            if val_dir is not None:
                log.info("%s has only %d images (< data.min_val_images=%d): merged into train", val_dir, val_count, self.min_val_images)
            train = self._read(train_dir, *([val_dir] if val_dir is not None else []))  # one mapped file
        test = None
        if draw_test:  # before val, so that the test patients do not depend on the run's seed
            train, test = self._draw(train, "test")
        if val is None:
            train, val = self._draw(train, "val")
        splits = {"train": train, "val": val, **({"test": test} if test is not None else {})}
        for name in ("val", "test"):
            if name in splits:
                log_patient_overlap(self.patient_groups(splits["train"].paths), self.patient_groups(splits[name].paths),
                                    len(splits[name]), name)
        return splits

    def _draw(self, pool: Split, name: str) -> tuple[Split, Split]:
        """(the rest, split `name`) of `pool`: the images the run's checkpoint recorded for it
        (`evaluate`), else a patient-level draw."""
        if name in self.recorded:
            keep, drawn = self._recorded_index(pool, name)
        elif name == "val" and self.folds:
            keep, drawn = self._fold_index(pool)
        else:
            fraction, seed = (self.test_fraction, self.test_seed) if name == "test" else (self.val_fraction, self.seed)
            patients = self.patient_groups(pool.paths)
            unmatched = sum(p.startswith(ONE_IMAGE_GROUP) for p in patients)
            if unmatched:
                log.info("%d of %d image names name no patient (Kermany patterns): one group per image", unmatched, len(patients))
            keep, drawn = patient_split(pool.labels, patients, fraction, seed)
            log.info("%s split: %.0f%% of train's patients per class (seed %d)", name, 100 * fraction, seed)
        rest, split = pool.subset(keep), pool.subset(drawn)
        self.derived[name] = [self.source_name(split, name, i) for i in range(len(split))]
        return rest, split

    def _fold_index(self, pool: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """(the other folds, fold `data.fold`) of train, by patient; the same folds for every run seed."""
        fold_of = patient_folds(pool.labels, self.patient_groups(pool.paths), self.folds, self.fold_seed)
        self.fold_of = {self.source_name(pool, "train", i): f for i, f in enumerate(fold_of)}
        in_fold = torch.tensor([f == self.fold for f in fold_of], dtype=torch.bool)
        log.info("val split: fold %d of %d, by patient and stratified by class (data.fold_seed %d)", self.fold, self.folds, self.fold_seed)
        return torch.nonzero(~in_fold).flatten(), torch.nonzero(in_fold).flatten()

    def split_rows(self) -> list[dict[str, Any]]:
        """splits.csv's rows, with each train and val image's fold under data.folds."""
        rows = super().split_rows()
        if self.folds:
            for row in rows:
                row["fold"] = self.fold_of.get(row["path"], "")
        return rows

    def _recorded_index(self, pool: Split, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The run's own split `name`, by the paths its checkpoint recorded."""
        recorded = set(self.recorded[name])
        chosen = torch.tensor([self.source_name(pool, "train", i) in recorded for i in range(len(pool))])
        found = int(chosen.sum())
        if found == 0:
            raise UserInputError(
                f"data.root: {self.root} holds none of the {len(recorded)} {name} images the checkpoint's run "
                "recorded; expected the folder the run was trained on"
            )
        if found < len(recorded):
            log.warning("%d of the run's %d recorded %s images are missing from %s", len(recorded) - found, len(recorded), name, self.root)
        log.info("%s split: the %d images the run recorded", name, found)
        return torch.nonzero(~chosen).flatten(), torch.nonzero(chosen).flatten()

    def source_name(self, split: Split, name: str, index: int) -> str:
        path = split.paths[index]  # type: ignore[index]  # folder splits always carry their paths
        return path_text(path.relative_to(self.root).as_posix())

    def patient_groups(self, paths: list[Path] | None) -> list[str]:
        """The patient of each image, the group a patient-level split keeps on one side."""
        return patient_groups(paths)

    def patient_name(self, split: Split, index: int) -> str:
        return patient_id(split.paths[index]) or ""  # type: ignore[index]

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the splits drawn from train, so `evaluate split=val` (or
        split=test) rebuilds them."""
        return {f"derived_{name}": paths for name, paths in self.derived.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if any(state_dict.get(f"derived_{name}") != paths for name, paths in self.derived.items()):
            log.warning("the splits drawn from train differ from those the checkpoint recorded (the folder or a seed changed)")


__getattr__ = forwarding(__name__)  # the names that moved out of this module, from where they are now
