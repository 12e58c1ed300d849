"""The image files `predict` and `adapt` are pointed at: one file, or every image below a folder,
read as a checkpoint's model reads them, the unreadable ones set aside and named."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xray_cls.core.errors import UserInputError

log = logging.getLogger(__name__)


@dataclass
class InputFiles:
    images: list[Path]
    not_images: int = 0  # junk beside the images: .DS_Store, ._* AppleDouble files, notes, ...
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


def find_inputs(input_path: Path) -> InputFiles:
    """The image files to predict or adapt on: `input_path` itself, or every image below it."""
    from xray_cls.data import IMAGE_SUFFIXES, is_image_file

    if input_path.is_file():
        return InputFiles([input_path])
    if not input_path.is_dir():
        raise UserInputError(f"input={input_path} does not exist; expected an image file or a folder of images")
    files = sorted(p for p in input_path.rglob("*") if p.is_file())
    images = [p for p in files if is_image_file(p)]
    if not images:
        raise UserInputError(
            f"input={input_path} holds no images (searched recursively for {', '.join(sorted(IMAGE_SUFFIXES))}; "
            f"found {len(files)} other file(s))"
        )
    return InputFiles(images, not_images=len(files) - len(images))


def read_chunk(paths: list[Path], size: int, geometry: str, found: InputFiles) -> tuple[list[Path], Any]:
    """The readable images among `paths` as uint8 (N, 1, size, size); the others go to found.unreadable."""
    import numpy as np
    import torch

    from xray_cls.data import read_images

    results = read_images(paths, size, geometry)
    found.unreadable += [(p, str(r)) for p, r in zip(paths, results) if isinstance(r, UserInputError)]
    ok = [(p, r) for p, r in zip(paths, results) if not isinstance(r, UserInputError)]
    if not ok:
        return [], torch.empty(0, 1, size, size, dtype=torch.uint8)
    return [p for p, _ in ok], torch.from_numpy(np.stack([r for _, r in ok])).unsqueeze(1)
