"""Reading a MedMNIST-style `.npz` that someone sent, without trusting it.

An `.npz` is a zip of `.npy` files, each a header (dtype, shape) and then the raw array. numpy's
own reader allocates what a header declares before reading a byte of data, so a 75 KB file whose
header claims (60000, 1024, 1024) asks for 58.6 GiB. Here every entry is checked before anything
is allocated:

- its header is parsed by numpy's header reader (a literal, never evaluated code) and must
  declare a plain numeric array: no object arrays (pickles), no structured or string dtypes;
- the size that header implies must be exactly the size the zip says the entry inflates to, and
  that size must be possible from the compressed bytes the file really holds (deflate expands at
  most 1032 times), so what is allocated is in proportion to the file;
- the arrays are then read by numpy's own reader, with pickles off.

The images then become what the networks take (`gray_images`): uint8 (N, H, W), colour averaged
to gray as Pillow does for a folder's images, other bit depths and floats scaled, and anything
that cannot be read as a picture (NaN, a negative pixel, a fifth axis) refused in one line.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from xray_cls.core.errors import UserInputError
from xray_cls.core.files import path_text
from xray_cls.data.images import bit_depth

MAX_HEADER_BYTES = 10_000  # numpy's own default bound on a .npy header
DEFLATE_MAX_RATIO = 1032  # the most that deflate can expand (zlib's technical notes)
LOCAL_HEADER_BYTES = 30  # a zip entry's local header before its name: its data starts after both
NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats
CONVERT_PIXELS = 2**24  # images converted to uint8 about this many pixels at a time
# Pillow's RGB -> L (ITU-R 601-2 luma in 16-bit fixed point): what a folder's colour image becomes.
LUMA = (19595, 38470, 7471)


def expected_npz(path: Path) -> str:
    return f"data.path: {path_text(path)}"


def read_arrays(path: Path, keys: list[str], where: str | None = None) -> dict[str, np.ndarray]:
    """The arrays `keys` of the `.npz` at `path`, each checked before it is allocated; errors name
    it as `where` says (data.path by default)."""
    where = where or expected_npz(path)
    if path.is_dir():
        raise UserInputError(f"{where} is a folder; expected a MedMNIST-style .npz file")
    if not path.is_file():
        raise UserInputError(f"{where} does not exist; expected a MedMNIST-style .npz file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            missing = [key for key in keys if f"{key}.npy" not in names]
            if missing:
                raise UserInputError(f"{where} lacks the key(s) {', '.join(missing)}; expected {', '.join(keys)}")
            return {key: read_entry(archive, archive.getinfo(f"{key}.npy"), where) for key in keys}
    except UserInputError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError, NotImplementedError,
            MemoryError) as err:
        # a cut or altered zip, a bad CRC or deflate stream, an encrypted or foreign entry, a header numpy cannot parse
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise UserInputError(f"{where} is not a readable .npz file ({reason})") from None


def read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    """One `.npy` entry: its header and sizes checked, then read with pickles off."""
    key = info.filename.removesuffix(".npy")
    if info.flag_bits & 0x1:
        raise UserInputError(f"{where}: {key} is encrypted; expected a plain .npz as numpy writes it")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise UserInputError(f"{where}: {key} is compressed with zip method {info.compress_type}; expected stored or deflated "
                             "entries, as numpy.savez and savez_compressed write them")
    if info.header_offset + LOCAL_HEADER_BYTES + info.compress_size > archive.start_dir:  # the zip's own claim, checked
        raise UserInputError(f"{where}: {key} claims {size_text(info.compress_size)} of data that the file does not hold; "
                             "the file is altered or damaged")
    most = info.compress_size if info.compress_type == zipfile.ZIP_STORED else info.compress_size * DEFLATE_MAX_RATIO + 64
    if info.file_size > most:
        raise UserInputError(f"{where}: {key} claims {size_text(info.file_size)} but holds {size_text(info.compress_size)} of data, "
                             "more than deflate can expand to; the file is altered or damaged")
    with archive.open(info) as entry:
        dtype, shape, header_bytes = read_header(entry, where, key)
    declared = header_bytes + int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared != info.file_size:
        raise UserInputError(f"{where}: the header of {key} declares {shape_text(shape)} {dtype}, {size_text(declared)}, but the "
                             f"entry holds {size_text(info.file_size)}; the file is altered or damaged")
    with archive.open(info) as entry:
        return np.lib.format.read_array(entry, allow_pickle=False, max_header_size=MAX_HEADER_BYTES)


def read_header(entry: zipfile.ZipExtFile, where: str, key: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, header length) of a `.npy` stream; what is not a plain numeric array is refused."""
    try:
        version = np.lib.format.read_magic(entry)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(entry, max_header_size=MAX_HEADER_BYTES)
    except Exception as err:  # noqa: BLE001  numpy's parser of a hostile header fails in many ways (a TokenError among them)
        reason = " ".join(str(err).split())[:150] or type(err).__name__
        raise UserInputError(f"{where}: {key} has no readable .npy header ({reason}); the file is altered or damaged") from None
    if dtype.hasobject:
        raise UserInputError(f"{where}: {key} is an object array (pickled Python objects), which is never loaded; "
                             "expected numbers (uint8 images, integer labels)")
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise UserInputError(f"{where}: {key} holds {dtype} values; expected numbers (uint8 images, integer labels)")
    return dtype, shape, entry.tell()


def gray_images(images: np.ndarray, where: str, key: str, unit_floats: bool = False) -> np.ndarray:
    """uint8 (N, H, W) from (N, H, W) or (N, H, W, C) images of any numeric type, as a folder's
    images are read: colour to gray by Pillow's weights, other integers each by its own bit depth
    (as 16-bit PNGs are), floats in [0, 1] (`unit_floats`: decided over every split of the file) or
    [0, 255]. Converted a few images at a time, so no float copy of the whole array is made."""
    if images.ndim == 4 and images.shape[-1] in (1, 3, 4):  # MedMNIST's RGB sets; a fourth channel (alpha) is left out
        channels = images.shape[-1]
    elif images.ndim == 3:
        channels = 0
    else:
        raise UserInputError(f"{where}: {key} has shape {shape_text(images.shape)}; expected (N, H, W) or (N, H, W, 1 or 3)")
    if images.dtype == np.uint8 and channels in (0, 1):
        return images.reshape(images.shape[:3])
    check_pixels(images, where, key)
    gray = np.empty(images.shape[:3], dtype=np.uint8)
    step = max(1, CONVERT_PIXELS // max(1, int(np.prod(images.shape[1:]))))
    for start in range(0, len(images), step):
        chunk = images[start : start + step].astype(np.float64)
        chunk *= pixel_scales(chunk, images.dtype, unit_floats).reshape(-1, *[1] * (chunk.ndim - 1))
        np.clip(np.round(chunk, out=chunk), 0, 255, out=chunk)
        if channels >= 3:  # Pillow's fixed-point luma of the 8-bit values, so that a folder and an .npz agree
            rgb = chunk[..., :3].astype(np.uint32)
            chunk = (rgb[..., 0] * LUMA[0] + rgb[..., 1] * LUMA[1] + rgb[..., 2] * LUMA[2] + 0x8000) >> 16
        elif channels == 1:
            chunk = chunk[..., 0]
        gray[start : start + step] = chunk
    return gray


def check_pixels(images: np.ndarray, where: str, key: str) -> None:
    """Pixel values a picture can hold: not booleans; integers >= 0; floats finite in [0, 1] or [0, 255]."""
    if images.dtype.kind == "b":
        raise UserInputError(f"{where}: {key} holds true/false values; expected pixel values (uint8 0-255)")
    if images.size == 0:
        return
    low, high = np.min(images), np.max(images)
    if images.dtype.kind == "f":
        if not (np.isfinite(low) and np.isfinite(high)):
            raise UserInputError(f"{where}: {key} holds NaN or infinite pixel values; expected finite numbers in [0, 1] or [0, 255]")
        if low < 0 or high > 255:
            raise UserInputError(f"{where}: {key} holds pixel values from {low:.4g} to {high:.4g}; expected [0, 1] or [0, 255]")
    elif low < 0:
        raise UserInputError(f"{where}: {key} holds negative pixel values (down to {low}); expected 0-255 or a bit depth's range")


def pixel_scales(chunk: np.ndarray, dtype: np.dtype, unit_floats: bool) -> np.ndarray:
    """Per image, what its values are multiplied by to become 0-255."""
    if dtype.kind == "f":
        return np.full(len(chunk), 255.0 if unit_floats else 1.0)
    tops = chunk.reshape(len(chunk), -1).max(axis=1) if chunk.size else np.zeros(len(chunk))
    return np.array([255 / (2 ** bit_depth(np.array([top])) - 1) for top in tops])


def unit_floats(arrays: list[np.ndarray]) -> bool:
    """Whether the file's float images are in [0, 1]: every float image array's values are at most 1."""
    floats = [a for a in arrays if a.dtype.kind == "f" and a.size]
    return bool(floats) and all(np.nanmax(a) <= 1 for a in floats)


def labels_of(labels: np.ndarray, count: int, where: str, key: str) -> np.ndarray:
    """int64 (N,) class numbers of (N,) or (N, 1) labels, one per image."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise UserInputError(f"{where}: {key} has {labels.shape[1]} labels per image (a multi-label set such as ChestMNIST); "
                             "expected one class per image, shape (N,) or (N, 1)")
    if labels.ndim not in (1, 2):
        raise UserInputError(f"{where}: {key} has shape {shape_text(labels.shape)}; expected (N,) or (N, 1)")
    flat = labels.reshape(-1)
    if len(flat) != count:
        raise UserInputError(f"{where} has {count} {key.removesuffix('_labels')} images and {len(flat)} labels; "
                             "expected one label per image")
    if flat.dtype.kind == "f" and not (np.all(np.isfinite(flat)) and np.all(flat == np.round(flat))):
        raise UserInputError(f"{where}: {key} holds labels that are not whole numbers; expected class numbers 0, 1, ...")
    return flat.astype(np.int64)


def shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def size_text(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count:,} bytes"
