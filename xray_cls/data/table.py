"""Label tables: images under `data.root` and a CSV that says each one's class, patient and
(optionally) official split; the layout of RSNA, NIH ChestX-ray14 and CheXpert (conf/data/).

A table is data from outside: every row is checked and a bad one is one line naming the file,
the row and what was expected. Rows are grouped per image (RSNA lists an image once per box): one
image with two different labels is refused. An image path that leaves `data.root` is refused; a
missing image is counted, and the run refuses when more than `max_missing` of them are missing.
The images then go through the folders' decoding, cache and patient-level splits.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xray_cls.core.errors import UserInputError
from xray_cls.core.files import path_text
from xray_cls.core.options import check_choice, check_number
from xray_cls.data.folder import ImageFolderDataModule, decoded_split
from xray_cls.data.options import UNCERTAIN
from xray_cls.data.splits import Split

log = logging.getLogger(__name__)

BOM = "\ufeff"  # byte-order marks, which editors put at a text's start (even twice): never part of a name
MAX_TABLE_BYTES = 2**30  # the largest table read (NIH's is 8 MB)
csv.field_size_limit(2**20)


@dataclass
class Image:
    path: Path
    label: int
    patient: str
    split: str | None
    row: int  # the first row that named it


class TableDataModule(ImageFolderDataModule):
    """Images and a label table: `root/csv` (or one table per official split), images under
    `root/image_root` (one folder, or several glob patterns), each row's path from `path_column`
    or `path_pattern`, its class from `label_values` (class: the values meaning it) or `finding`
    (a name in a `|`-separated column), its patient from `patient_column` or `patient_pattern`."""

    def __init__(
        self,
        root: str | None = None,
        csv: str | Mapping[str, str] | None = None,
        image_root: str | list[str] = ".",
        path_column: str | None = None,
        path_pattern: str | None = None,
        strip_prefix: str = "",
        label_column: str | None = None,
        label_values: Mapping[str, list[str]] | None = None,
        finding: str | None = None,
        uncertain_values: list[str] | None = None,
        uncertain: str = "ignore",
        patient_column: str | None = None,
        patient_pattern: str | None = None,
        split_column: str | None = None,
        split_values: Mapping[str, list[str]] | None = None,
        split_files: Mapping[str, str] | None = None,
        filters: Mapping[str, list[str]] | None = None,
        max_missing: float = 0.0,
        classes: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if label_values and classes is None:
            classes = [str(c) for c in label_values]  # the table's classes are its label mapping's, in order
        super().__init__(root=root, classes=classes, **kwargs)
        if not csv:
            raise UserInputError("data.csv is not set; expected the label table's file name under data.root")
        if (path_column is None) == (path_pattern is None):
            raise UserInputError("data.path_column and data.path_pattern: expected exactly one, the column of the image path "
                                 "or a pattern such as '{patientId}.dcm'")
        if not label_column or (label_values is None) == (finding is None):
            raise UserInputError("data.label_column with exactly one of data.label_values (class: its values) and data.finding "
                                 "(a name in a |-separated column) is expected")
        if finding is not None and len(self.class_names) != 2:
            raise UserInputError(f"data.finding={finding} makes two classes (without, with it); got {list(self.class_names)}")
        self.tables = dict(csv) if isinstance(csv, Mapping) else {"": str(csv)}
        self.image_root = [image_root] if isinstance(image_root, str) else list(image_root)
        self.path_column, self.path_pattern, self.strip_prefix = path_column, path_pattern, strip_prefix
        self.label_column, self.finding = label_column, finding
        self.label_values = {str(k): [str(v) for v in vs] for k, vs in (label_values or {}).items()}
        self.uncertain_values = [str(v) for v in uncertain_values or []]
        self.uncertain = check_choice("data.uncertain", uncertain, UNCERTAIN)
        self.patient_column = patient_column
        self.patient_pattern = re.compile(patient_pattern) if patient_pattern else None
        self.split_column, self.split_values = split_column, {k: [str(v) for v in vs] for k, vs in (split_values or {}).items()}
        self.split_files = dict(split_files or {})
        self.filters = {k: [str(v) for v in vs] for k, vs in (filters or {}).items()}
        self.max_missing = float(check_number("data.max_missing", max_missing, 0, 1))
        self.patient_of: dict[str, str] = {}

    def source_text(self) -> str:
        return f"data.csv: {', '.join(path_text(self.root / t) for t in self.tables.values())}"

    def read_splits(self) -> dict[str, Split]:
        if not self.root.is_dir():
            raise UserInputError(f"data.root: {self.root} does not exist or is not a folder; expected the dataset's folder")
        images = self.read_images_table()
        by_split: dict[str | None, list[Image]] = {}
        for image in images:
            by_split.setdefault(image.split, []).append(image)
        unknown = sorted(str(s) for s in by_split if s not in (None, "train", "val", "test"))
        if unknown:
            raise UserInputError(f"data.split_values: the split {unknown[0]!r} is not train, val or test")
        official_test = by_split.get("test")
        if self.only_split == "test" and official_test:
            return {"test": self._decode(official_test)}
        train = self._decode(by_split.get("train", []) + by_split.get(None, []))
        splits: dict[str, Split] = {}
        if official_test:
            splits["test"] = self._decode(official_test)
        else:
            train, splits["test"] = self._draw(train, "test")
        if by_split.get("val") and not self.folds:
            val = self._decode(by_split["val"])
        else:
            train, val = self._draw(train, "val")
        return {"train": train, "val": val, **splits}

    def _decode(self, images: list[Image]) -> Split:
        if not images:
            raise UserInputError(f"data.csv: {self.tables} leaves a split without images; expected rows for train (and test, if official)")
        return decoded_split([i.path for i in images], [i.label for i in images], self.requested_size, self.cache_dir,
                             self.geometry, [self.root / t for t in self.tables.values()])

    def read_images_table(self) -> list[Image]:
        """Every image the tables name, once, with its label, patient and official split, checked."""
        found: dict[Path, Image] = {}
        locate = self.locator()
        missing: list[str] = []
        named = 0
        in_split_files = self.read_split_files()
        for split, name in self.tables.items():
            path = self.root / name
            for number, row in self.rows(path):
                if not self.kept(row):
                    continue
                label = self.label_of(row, path, number)
                if label is None:  # uncertain, ignored
                    continue
                raw = self.raw_path(row, path, number)
                named += 1
                image = locate(raw, f"{path_text(path)} row {number}")
                if image is None:
                    missing.append(raw)
                    continue
                official = split or self.split_of(row, raw, in_split_files, path, number)
                patient = self.patient_from(row, raw, path, number)
                self.add(found, Image(image, label, patient, official, number), path)
        self.check_missing(missing, named)
        images = self.in_official_splits(list(found.values()))
        self.patient_of = {str(i.path): i.patient for i in images}
        log.info("%s: %d images of %d patients", ", ".join(self.tables.values()), len(images), len(set(self.patient_of.values())))
        return images

    def rows(self, path: Path) -> Any:
        """(row number, {column: value}) of a CSV, the header checked for the columns this table needs."""
        if not path.is_file():
            raise UserInputError(f"data.csv: {path} does not exist; expected the label table under data.root")
        if path.stat().st_size > MAX_TABLE_BYTES:
            raise UserInputError(f"data.csv: {path} is larger than {MAX_TABLE_BYTES // 2**20} MB; expected a label table")
        with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f)
            header = [h.strip().lstrip(BOM) for h in next(reader, [])]
            needed = [c for c in (self.path_column, self.label_column, self.patient_column, self.split_column, *self.filters) if c]
            needed += re.findall(r"{([^{}]+)}", self.path_pattern or "")
            absent = [c for c in needed if c not in header]
            if absent:
                raise UserInputError(f"{path_text(path)}: no column {absent[0]!r}; expected a header with {', '.join(needed)}, "
                                     f"found {', '.join(header[:12]) or 'none'}")
            for number, values in enumerate(reader, start=2):
                if values:
                    yield number, dict(zip(header, (v.strip() for v in values)))

    def kept(self, row: dict[str, str]) -> bool:
        return all(row.get(column) in allowed for column, allowed in self.filters.items())

    def label_of(self, row: dict[str, str], path: Path, number: int) -> int | None:
        value = row.get(self.label_column, "")
        if self.finding is not None:
            return int(self.finding in {v.strip() for v in value.split("|")})
        if value in self.uncertain_values:
            return None if self.uncertain == "ignore" else (0 if self.uncertain == "zeros" else len(self.class_names) - 1)
        for label, name in enumerate(self.class_names):
            if value in self.label_values.get(name, []):
                return label
        expected = "; ".join(f"{name}: {', '.join(map(repr, self.label_values.get(name, [])))}" for name in self.class_names)
        raise UserInputError(f"{path_text(path)} row {number}: {self.label_column}={value[:60]!r} is no value of a class; expected {expected}"
                             + (f", or an uncertain value {self.uncertain_values}" if self.uncertain_values else ""))

    def raw_path(self, row: dict[str, str], path: Path, number: int) -> str:
        raw = row.get(self.path_column, "") if self.path_column else self.path_pattern.format(**row)
        if not raw:
            raise UserInputError(f"{path_text(path)} row {number}: no image path; expected {self.path_column or self.path_pattern}")
        return raw.removeprefix(self.strip_prefix)

    def locator(self) -> Any:
        """A function from a table's path to the image file under data.root (None: missing); one that
        leaves data.root is refused."""
        root = self.root.resolve()
        dirs = sorted({d for pattern in self.image_root
                       for d in ([self.root / pattern] if pattern in ("", ".") else self.root.glob(pattern)) if d.is_dir()})
        if not dirs:
            raise UserInputError(f"data.image_root: no folder {' or '.join(self.image_root)} under {self.root}")
        index: dict[str, Path] | None = None
        if len(dirs) > 1:  # NIH's images_001/images ... images_012/images: one listing of each
            index = {}
            for folder in dirs:
                with os.scandir(folder) as entries:
                    index.update({e.name: folder / e.name for e in entries})

        def locate(raw: str, where: str) -> Path | None:
            if "\x00" in raw:
                raise UserInputError(f"{where}: the image path {raw[:100]!r} holds a NUL character; expected a file name")
            candidate = index.get(raw) if index is not None else dirs[0] / raw
            if candidate is None:
                return None
            try:
                if not candidate.resolve().is_relative_to(root):
                    raise UserInputError(f"{where}: the image path {raw[:100]!r} leaves data.root {self.root}; expected paths inside it")
                return candidate if candidate.is_file() else None
            except (OSError, RuntimeError) as err:  # a name too long for the file system; a loop of links (RuntimeError before 3.13)
                reason = getattr(err, "strerror", None) or str(err)
                raise UserInputError(f"{where}: the image path {raw[:100]!r} cannot be a file ({reason[:100]}); expected a file name "
                                     "under data.root") from None

        return locate

    def split_of(self, row: dict[str, str], raw: str, in_split_files: dict[str, str], path: Path, number: int) -> str | None:
        if self.split_column:
            value = row.get(self.split_column, "")
            for split, values in self.split_values.items():
                if value in values:
                    return split
            raise UserInputError(f"{path_text(path)} row {number}: {self.split_column}={value[:60]!r} is in no split; expected "
                                 + "; ".join(f"{s}: {', '.join(v)}" for s, v in self.split_values.items()))
        if in_split_files:
            return in_split_files.get(Path(raw).name, "unlisted")
        return None

    def read_split_files(self) -> dict[str, str]:
        """file name -> official split, from the split files (NIH's train_val_list.txt, test_list.txt)."""
        found: dict[str, str] = {}
        for split, name in self.split_files.items():
            path = self.root / name
            if not path.is_file():
                raise UserInputError(f"data.split_files: {path} does not exist; expected a list of the {split} images, one a line")
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                name = line.strip().lstrip(BOM)
                if name:
                    found[name] = split
        return found

    def patient_from(self, row: dict[str, str], raw: str, path: Path, number: int) -> str:
        if self.patient_column:
            patient = row.get(self.patient_column, "")
            if not patient:
                raise UserInputError(f"{path_text(path)} row {number}: {self.patient_column} is empty; expected the patient")
            return patient
        if self.patient_pattern:
            match = self.patient_pattern.search(raw)
            if not match:
                raise UserInputError(f"{path_text(path)} row {number}: the path {raw[:100]!r} does not match data.patient_pattern "
                                     f"{self.patient_pattern.pattern!r}")
            return match.group(1) if match.groups() else match.group(0)
        return f"image:{raw}"  # no patients: one group per image

    def add(self, found: dict[Path, Image], image: Image, path: Path) -> None:
        """One image once: a second row must agree with the first."""
        first = found.get(image.path)
        if first is None:
            found[image.path] = image
        elif first.label != image.label:
            names = self.class_names
            raise UserInputError(
                f"{path_text(path)} rows {first.row} and {image.row}: {path_text(image.path.relative_to(self.root))} is labeled "
                f"{names[first.label]} and {names[image.label]}; expected one label per image"
            )

    def check_missing(self, missing: list[str], named: int) -> None:
        if not missing:
            return
        share = len(missing) / max(1, named)
        what = f"{len(missing)} of the {named} images the table names are missing (first: {missing[0][:100]!r})"
        if share > self.max_missing:
            raise UserInputError(f"data.csv: {what}; expected them under {self.root / self.image_root[0]}, "
                                 f"or data.max_missing >= {share:.4f} to train without them")
        log.warning("data.csv: %s; trained without them (data.max_missing=%s)", what, self.max_missing)

    def in_official_splits(self, images: list[Image]) -> list[Image]:
        """The images, none of whose patients is in two official splits; those outside the split
        files left out, counted."""
        sides: dict[str, str] = {}
        for image in images:
            if image.split in (None, "unlisted"):
                continue
            other = sides.setdefault(image.patient, image.split)
            if other != image.split:
                raise UserInputError(f"data.split_files: patient {image.patient!r} is in both {other} and {image.split}; "
                                     "expected each patient in one official split")
        kept = [i for i in images if i.split != "unlisted"]
        if len(kept) < len(images):
            log.warning("data.split_files: %d images are in no split file and are left out", len(images) - len(kept))
        return kept

    def patient_groups(self, paths: list[Path] | None) -> list[str]:
        return [self.patient_of.get(str(p), f"image:{p}") for p in paths or []]

    def patient_name(self, split: Split, index: int) -> str:
        return self.patient_of.get(str(split.paths[index]), "")  # type: ignore[index]
