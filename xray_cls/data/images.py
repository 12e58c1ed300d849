"""Reading one image file as the networks see it: 8-bit gray (JPEG, PNG of any mode and bit depth,
DICOM), made square by `geometry` and resized."""

from __future__ import annotations

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

from xray_cls.errors import UserInputError

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm"}


GEOMETRIES = ("crop", "stretch")  # how a non-square image becomes square: see fit_square


def is_image_file(path: Path) -> bool:
    """An image by its suffix; hidden files (.DS_Store, macOS ._* AppleDouble files) never are."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def open_gray(path: Path, draft_size: int) -> Any:
    """An image file as an 8-bit grayscale PIL image, at least about draft_size on each side."""
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() == ".dcm":
        return Image.fromarray(read_dicom(path))
    try:
        with Image.open(path) as image:
            image.draft("L", (draft_size, draft_size))  # JPEG: let the decoder downscale by up to 8x for free
            image.load()
            declared = png_significant_bits(path) if image.format == "PNG" and image.mode.startswith("I") else None
            return to_grayscale(image, declared)
    except Image.DecompressionBombError as err:  # PIL refuses images over ~179 megapixels
        raise UserInputError(f"{path} is too large to decode safely ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise UserInputError(f"{path} is not a readable image ({err})") from None


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


def png_significant_bits(path: Path) -> int | None:
    """The gray (or largest colour) value of a PNG's sBIT chunk, which Pillow does not report."""
    with path.open("rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while len(header := f.read(8)) == 8:  # chunks before the image data: length, type, data, CRC
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind in (b"IDAT", b"IEND"):
                return None
            data = f.read(length)
            if kind == b"sBIT" and data:
                return max(data[:3]) if len(data) >= 3 else data[0]  # gray+alpha: gray first
            f.seek(4, os.SEEK_CUR)
    return None


def to_grayscale(image: Any, significant_bits: int | None = None) -> Any:
    """8-bit grayscale from any PIL mode; 16- and 32-bit integer images are scaled by their bit
    depth (`bit_depth`), float ones by their own range."""
    from PIL import Image

    if image.mode.startswith("I"):
        pixels = np.asarray(image, dtype=np.float64).clip(0)
        top = 2 ** bit_depth(pixels, significant_bits) - 1
        return Image.fromarray(np.clip(pixels / top * 255, 0, 255).round().astype(np.uint8))
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        span = max(pixels.max() - pixels.min(), 1e-12)
        return Image.fromarray(((pixels - pixels.min()) / span * 255).round().astype(np.uint8))
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image.convert("L")


def read_dicom(path: Path) -> np.ndarray:
    """A DICOM file's image as uint8 (H, W), displayed as its own header says (`dicom_gray`)."""
    import pydicom
    from PIL import Image

    try:
        dataset = pydicom.dcmread(path)
        frames = int(dataset.get("NumberOfFrames") or 1)
        if frames > 1:
            raise UserInputError(f"{path} holds {frames} frames; expected a DICOM with one image")
        pixel_count = int(dataset.get("Rows", 0)) * int(dataset.get("Columns", 0))
        if Image.MAX_IMAGE_PIXELS and pixel_count > 2 * Image.MAX_IMAGE_PIXELS:  # PIL's limit for other images
            raise UserInputError(f"{path} is too large to decode safely ({pixel_count} pixels)")
        return dicom_gray(dataset, dataset.pixel_array)
    except UserInputError:
        raise
    except pydicom.errors.InvalidDicomError:
        raise UserInputError(f"{path} is not a readable image (no DICOM header: 'DICM' after a 128-byte preamble)") from None
    except PermissionError as err:
        raise UserInputError(f"{path} is not a readable image ({err})") from None
    except Exception as err:  # noqa: BLE001  a hostile file can fail anywhere in pydicom; never a traceback
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        if "missing dependencies" in lines[0]:  # pydicom lists the plugins that would decode it, one a line
            raise UserInputError(
                f"{path}: {lines[0]} {'; '.join(lines[1:])} (pip install one of them)"
            ) from None
        raise UserInputError(f"{path} is not a readable image ({' '.join(lines)[:300]})") from None


def dicom_gray(dataset: Any, pixels: np.ndarray) -> np.ndarray:
    """Stored values -> uint8 through the DICOM's own transforms, in the standard's order (PS3.3
    C.11): the modality LUT or rescale, then the VOI LUT or else the window, then MONOCHROME1
    inverted. Their output range becomes 0-255: the VOI LUT's nominal bit depth (C.11.2.1.1), the
    window's output range, or, with neither, the stored bit depth after rescale."""
    from pydicom.pixels import apply_modality_lut
    from pydicom.pixels.processing import apply_voi, apply_windowing

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3:  # colour: pydicom has already converted YBR to RGB
        from PIL import Image

        return np.asarray(Image.fromarray(pixels.astype(np.uint8), "RGB").convert("L"))
    bits = int(dataset.BitsStored)
    signed = int(dataset.get("PixelRepresentation", 0)) == 1
    ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1])
    pixels, ends = apply_modality_lut(pixels, dataset), apply_modality_lut(ends, dataset)
    voi_lut = dataset.get("VOILUTSequence")
    if voi_lut and "LUTDescriptor" in voi_lut[0] and "LUTData" in voi_lut[0]:
        pixels = apply_voi(pixels.round().astype(np.int64) if pixels.dtype.kind == "f" else pixels, dataset)
        ends = np.array([0, 2 ** int(voi_lut[0].LUTDescriptor[2]) - 1])
    elif dataset.get("WindowCenter") is not None and dataset.get("WindowWidth") is not None:
        pixels = apply_windowing(pixels, dataset)
        ends = apply_windowing(np.array([-np.inf, np.inf]), dataset)  # the window's output range
    low, high = float(ends.min()), float(ends.max())
    gray = np.clip((pixels.astype(np.float64) - low) / max(high - low, 1e-12), 0, 1) * 255
    if photometric == "MONOCHROME1":  # 0 is white
        gray = 255 - gray
    return gray.round().astype(np.uint8)


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
    if geometry not in GEOMETRIES:
        raise UserInputError(f"{option}={geometry!r} is not valid; expected one of {', '.join(GEOMETRIES)}")
    return geometry


def trained_geometry(preprocessing: dict[str, Any], ckpt: Any) -> str:
    """The geometry a checkpoint's model was trained with. Checkpoints written before it was
    recorded get `stretch`: how those versions fitted every folder and `predict` image."""
    if "geometry" not in preprocessing:
        log.info("%s records no preprocessing geometry (written by an older xray_cls): images are "
                 "stretched to a square, as that version did", ckpt)
        return "stretch"
    return check_geometry(preprocessing["geometry"], f"the preprocessing geometry of {ckpt}")
