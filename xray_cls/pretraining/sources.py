"""The images a pretraining learns from, without their labels.

Two kinds of source, read through the same decoding, cache and memory-mapped path as training:
- the run's `data` (any data config: the bundled .npz, a Kermany folder, a label table): every
  split but test, as its DataModule draws them. The test split (a folder's test/, a table's
  official test split, or the development test drawn from train) is left out unless
  `pretrain.include_test=true`, so that a fine-tuned model's test score stays honest;
- `pretrain.sources`: more folders (every image below them; a top-level test/ left out the same
  way) and `.npz` files (their `<split>_images`, test_images left out), labels never read.

The images are put in the order of their names, so that which split a DataModule drew an image
into (a draw by class) cannot change what the pretraining sees, or its result.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xray_cls.core.errors import UserInputError
from xray_cls.core.files import path_text

log = logging.getLogger(__name__)


@dataclass
class Unlabeled:
    images: torch.Tensor  # uint8 (N, 1, S, S)
    names: list[str]  # where each image came from: its file, or its .npz array and row
    counts: dict[str, int] = field(default_factory=dict)  # images of each source

    def files_sha256(self) -> str:
        """sha256 of the sorted names: which images a backbone was pretrained on."""
        return hashlib.sha256("\n".join(sorted(self.names)).encode()).hexdigest()


def data_images(datamodule: Any, include_test: bool) -> Unlabeled:
    """Every split of a set-up DataModule (test only with `include_test`), in the order of the names."""
    used = {name: split for name, split in datamodule.splits.items() if include_test or name != "test"}
    entries = sorted((datamodule.source_name(split, name, i), name, i) for name, split in used.items() for i in range(len(split)))
    if not entries:
        return Unlabeled(torch.empty(0, 1, 1, 1, dtype=torch.uint8), [], {datamodule.source_text(): 0})
    first = next(iter(used.values()))
    images = torch.empty((len(entries), *first.source.shape[1:]), dtype=torch.uint8)
    for name, split in used.items():  # each split's images gathered once, straight into their sorted places
        places = [(place, i) for place, (_, split_name, i) in enumerate(entries) if split_name == name]
        if places:
            where, rows = (torch.tensor(column, dtype=torch.long) for column in zip(*places))
            images[where] = split.gather(rows)
    source = datamodule.source_text()
    return Unlabeled(images, [f"{source}: {n}" for n, _, _ in entries], {source: len(entries)})


def extra_images(sources: list[str], size: int, geometry: str, cache_dir: Path | None, include_test: bool) -> list[Unlabeled]:
    """`pretrain.sources`, each a folder of images or an .npz, at `size` px."""
    read = []
    for source in sources:
        path = Path(str(source)).expanduser()
        if path.is_dir():
            read.append(folder_images(path, size, geometry, cache_dir, include_test))
        elif path.suffix.lower() == ".npz" and path.is_file():
            read.append(npz_images(path, size, geometry, include_test))
        else:
            what = "does not exist" if not path.exists() else "is neither a folder nor an .npz file"
            raise UserInputError(f"pretrain.sources: {path_text(path)} {what}; expected folders of images or .npz files")
    return read


def folder_images(root: Path, size: int, geometry: str, cache_dir: Path | None, include_test: bool) -> Unlabeled:
    from xray_cls.data.folder import decoded_split
    from xray_cls.data.images import is_image_file

    tops = [p for p in sorted(root.iterdir()) if include_test or not (p.is_dir() and p.name.lower() == "test")]
    paths = sorted(f for top in tops for f in ([top] if top.is_file() else top.rglob("*")) if f.is_file() and is_image_file(f))
    if not paths:
        raise UserInputError(f"pretrain.sources: {path_text(root)} holds no images"
                             + ("" if include_test else " outside test/") + "; expected JPEG, PNG or DICOM files")
    split = decoded_split(paths, [0] * len(paths), size, cache_dir, geometry, [root])  # no labels: all 0
    return Unlabeled(split.images, [path_text(p) for p in paths], {path_text(root): len(paths)})


def npz_images(path: Path, size: int, geometry: str, include_test: bool) -> Unlabeled:
    from xray_cls.data import npz
    from xray_cls.data.images import resize_uint8

    where = f"pretrain.sources: {path_text(path)}"
    try:
        with zipfile.ZipFile(path) as archive:
            keys = sorted(n.removesuffix(".npy") for n in archive.namelist() if n.endswith("_images.npy"))
    except (zipfile.BadZipFile, OSError) as err:
        raise UserInputError(f"{where} is not a readable .npz file ({str(err)[:150]})") from None
    keys = [k for k in keys if include_test or k != "test_images"]
    if not keys:
        raise UserInputError(f"{where} holds no <split>_images arrays" + ("" if include_test else " but test_images")
                             + "; expected a MedMNIST-style .npz")
    arrays = npz.read_arrays(path, keys, where)
    unit = npz.unit_floats(list(arrays.values()))
    images, names = [], []
    for key in keys:
        gray = torch.from_numpy(npz.gray_images(arrays.pop(key), where, key, unit).copy()).unsqueeze(1)
        if 0 in gray.shape[2:]:
            raise UserInputError(f"{where}: {key} are empty pictures; expected images of at least one pixel")
        images.append(gray if gray.shape[-2:] == (size, size) else resize_uint8(gray, size, geometry))
        names += [f"{path_text(path)}: {key}[{i}]" for i in range(len(gray))]
    return Unlabeled(torch.cat(images), names, {path_text(path): len(names)})


def joined(parts: list[Unlabeled]) -> Unlabeled:
    if not parts or sum(len(p.names) for p in parts) == 0:
        raise UserInputError("pretrain: no images to pretrain on; expected pretrain.data=true with a data config, "
                             "or pretrain.sources=[folders or .npz files]")
    sizes = {tuple(p.images.shape[1:]) for p in parts if len(p.names)}
    if len(sizes) > 1:
        raise UserInputError(f"pretrain: the sources give images of different shapes {sorted(sizes)}; expected one data.image_size")
    counts = {k: v for p in parts for k, v in p.counts.items()}
    filled = [p for p in parts if len(p.names)]
    if len(filled) == 1:  # no copy of the one source
        return Unlabeled(filled[0].images, filled[0].names, counts)
    return Unlabeled(torch.cat([p.images for p in filled]), [n for p in filled for n in p.names], counts)
