"""Reading one image file as the networks see it: 8-bit gray (JPEG, PNG of any mode and bit depth,
DICOM), made square by `geometry` and resized."""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xray_cls.core.errors import UserInputError
from xray_cls.core.files import path_text
from xray_cls.core.legacy_names import forwarding
from xray_cls.core.options import check_choice
from xray_cls.data import headers
from xray_cls.data.dicom import read_dicom
from xray_cls.data.options import GEOMETRIES

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm"}


def is_image_file(path: Path) -> bool:
    """An image by its suffix; hidden files (.DS_Store, macOS ._* AppleDouble files) never are."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def open_gray(path: Path, draft_size: int) -> Any:
    """An image file as an 8-bit grayscale PIL image, at least about draft_size on each side.

    The header is checked against the data before anything is decoded (`headers`): a file that
    declares more than it holds, or too much to decode safely, is refused in one line."""
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() == ".dcm":
        return Image.fromarray(read_dicom(path))
    data = read_file(path)
    try:
        if data.startswith(headers.JPEG_SIGNATURE):
            gray = headers.decode_jpeg_gray(path, data, draft_size)
            if gray is not None:
                return Image.fromarray(gray, "L")
        elif data.startswith(headers.PNG_SIGNATURE):
            headers.check_png(path, data)
        with Image.open(io.BytesIO(data)) as image:  # PNGs that passed their check, and other formats
            bits = 32 if image.mode in ("I", "F") else 16 if image.mode.startswith("I;16") else 8
            headers.check_size(path, *image.size, len(image.getbands()), bits)
            image.draft("L", (draft_size, draft_size))  # JPEG: let the decoder downscale by up to 8x for free
            image.load()
            declared = png_significant_bits(data) if image.format == "PNG" and image.mode.startswith("I") else None
            return to_grayscale(image, declared)
    except UserInputError:
        raise
    except Image.DecompressionBombError as err:  # PIL refuses images over ~179 megapixels
        raise UserInputError(f"{path_text(path)} is too large to decode safely ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserInputError(f"{path_text(path)} is not a readable image ({err})") from None


def read_file(path: Path) -> bytes:
    """The bytes of an image file, refused in one line when it cannot be read or is larger than
    anything this project decodes."""
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size > headers.MAX_DECODED_BYTES:
                raise UserInputError(
                    f"{path_text(path)} is too large to decode safely (over {headers.MAX_DECODED_BYTES / 2**20:,.0f} MiB)"
                )
            return f.read()
    except OSError as err:
        raise UserInputError(f"{path_text(path)} is not a readable image ({err})") from None


def fit_square(image: Any, size: int, geometry: str) -> Any:
    """A PIL image resized to (size, size): `crop` takes the centred square on its short side first
    (how MedMNIST made PneumoniaMNIST), `stretch` squeezes the whole image."""
    from PIL import Image

    if geometry == "crop":  # cropped first: resize(box=) would blend pixels from outside the box into its edges
        image = image.crop(center_square(*image.size))
    return image.resize((size, size), Image.Resampling.BILINEAR)


def center_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of the centred square on the short side."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def read_image(path: Path, size: int, geometry: str) -> np.ndarray:
    """One image file as a uint8 (size, size) grayscale array."""
    return np.asarray(fit_square(open_gray(path, size), size, geometry))


# How 16-bit pixels become 8-bit ones (part of the cache key, see CACHE_FORMAT): they are divided by
# the image's bit depth, so that 12-bit data fills 0-255 instead of its lowest 16 gray levels. The
# depth is the one the file declares (PNG sBIT, DICOM BitsStored); otherwise the smallest of these
# that holds the brightest pixel, since detectors write 10, 12, 14 or 16 bits and a 16-bit container
# whose values stop at 255 holds 8-bit data. An X-ray fills most of its range, so its brightest pixel
# reveals its depth; a darker one is read too bright, never clipped.
BIT_DEPTHS = (8, 10, 12, 14, 16)


def bit_depth(pixels: np.ndarray, declared: int | None = None) -> int:
    if declared:
        return declared
    top = int(pixels.max()) if pixels.size else 0
    return next((bits for bits in BIT_DEPTHS if top < 2**bits), top.bit_length())


def png_significant_bits(data: bytes) -> int | None:
    """The gray (or largest colour) value of a PNG's sBIT chunk, which Pillow does not report."""
    if not data.startswith(headers.PNG_SIGNATURE):
        return None
    offset = 8
    while offset + 8 <= len(data):  # chunks before the image data: length, type, data, CRC
        length, kind = int.from_bytes(data[offset : offset + 4], "big"), data[offset + 4 : offset + 8]
        if kind in (b"IDAT", b"IEND"):
            return None
        chunk = data[offset + 8 : offset + 8 + length]
        if kind == b"sBIT" and chunk:
            return max(chunk[:3]) if len(chunk) >= 3 else chunk[0]  # gray+alpha: gray first
        offset += 12 + length
    return None


def to_grayscale(image: Any, significant_bits: int | None = None) -> Any:
    """8-bit grayscale from any PIL mode; 16- and 32-bit integer images are scaled by their bit
    depth (`bit_depth`), float ones by their own range. Wide images are converted a band of rows
    at a time into the 8-bit result, so that no float copy of the whole image is ever made."""
    from PIL import Image

    if image.mode.startswith("I"):
        top = 2 ** bit_depth(np.array([max(image.getextrema()[1], 0)]), significant_bits) - 1

        def by_depth(band: np.ndarray) -> None:  # clip(band, 0) / top * 255, clipped to 0-255, in place
            np.maximum(band, 0, out=band)
            band /= top
            band *= 255
            np.clip(band, 0, 255, out=band)

        return Image.fromarray(_by_bands(image, by_depth))
    if image.mode == "F":
        low, high = image.getextrema()
        span = max(high - low, 1e-12)

        def by_range(band: np.ndarray) -> None:  # (band - low) / span * 255, in place
            band -= low
            band /= span
            band *= 255

        return Image.fromarray(_by_bands(image, by_range))
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image.convert("L")


def _by_bands(image: Any, scale: Any) -> np.ndarray:
    """uint8 (H, W) of `scale` applied in place to float64 bands of the image's rows, rounded."""
    width, height = image.size
    gray = np.empty((height, width), dtype=np.uint8)
    rows = max(1, headers.BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        band = np.asarray(image.crop((0, top, width, min(top + rows, height))), dtype=np.float64)
        scale(band)
        gray[top : top + len(band)] = np.round(band, out=band)
    return gray


def decode_pool() -> ThreadPoolExecutor:
    """PIL releases the GIL while decoding, so threads use every core."""
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def read_images(paths: list[Path], size: int, geometry: str, pool: ThreadPoolExecutor | None = None) -> list[np.ndarray | UserInputError]:
    """Each file as `read_image` gives it, or the error that says why it cannot be read."""

    def attempt(path: Path) -> np.ndarray | UserInputError:
        try:
            return read_image(path, size, geometry)
        except UserInputError as err:
            return err

    if pool is not None:
        return list(pool.map(attempt, paths))
    with decode_pool() as own_pool:
        return list(own_pool.map(attempt, paths))


DECODE_CHUNK = 256  # images decoded at a time: memory stays flat however large the folder
PROGRESS_SECONDS = 10.0  # a decode that outlasts this logs its progress this often


def decode_chunks(paths: list[Path], size: int, geometry: str, source: str = "images") -> Iterator[np.ndarray]:
    """uint8 (k, 1, size, size) arrays of consecutive images, DECODE_CHUNK at a time; the first
    unreadable file stops it. A long decode logs images/s and the time left (of `source`)."""
    started = last_report = time.monotonic()
    with decode_pool() as pool:
        for start in range(0, len(paths), DECODE_CHUNK):
            chunk = read_images(paths[start : start + DECODE_CHUNK], size, geometry, pool)
            for image in chunk:
                if isinstance(image, UserInputError):
                    raise image
            yield np.stack(chunk)[:, None]
            now, done = time.monotonic(), start + len(chunk)
            if now - last_report >= PROGRESS_SECONDS and done < len(paths):
                rate = done / (now - started)
                log.info("decoding %s: %d/%d images, %.0f images/s, %.0f s left",
                         source, done, len(paths), rate, (len(paths) - done) / rate)
                last_report = now


def decode_images(paths: list[Path], size: int, geometry: str, source: str = "images") -> np.ndarray:
    """uint8 (N, 1, size, size) in memory."""
    images = np.empty((len(paths), 1, size, size), dtype=np.uint8)
    start = 0
    for chunk in decode_chunks(paths, size, geometry, source):
        images[start : start + len(chunk)] = chunk
        start += len(chunk)
    return images


def resize_uint8(images: torch.Tensor, size: int, geometry: str = "crop") -> torch.Tensor:
    """Antialiased bilinear resize of uint8 (N, C, H, W) to (N, C, size, size), fitted as `fit_square` does."""
    if geometry == "crop":
        left, top, right, bottom = center_square(images.shape[-1], images.shape[-2])
        images = images[..., top:bottom, left:right]
    if images.shape[-2:] == (size, size):
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)


def check_geometry(geometry: Any, option: str) -> str:
    return check_choice(option, geometry, GEOMETRIES)


def trained_geometry(preprocessing: dict[str, Any], ckpt: Any) -> str:
    """The geometry a checkpoint's model was trained with. Checkpoints written before it was
    recorded get `stretch`: how those versions fitted every folder and `predict` image."""
    if "geometry" not in preprocessing:
        log.info("%s records no preprocessing geometry (written by an older xray_cls): images are "
                 "stretched to a square, as that version did", ckpt)
        return "stretch"
    return check_geometry(preprocessing["geometry"], f"the preprocessing geometry of {ckpt}")


__getattr__ = forwarding(__name__)  # the names that moved out of this module, from where they are now
