"""What an image file's header promises, checked against what the file holds, before it is decoded.

A header can lie: a 353-byte PNG may declare 13000x13000 pixels at 16 bits, a JPEG's frame
header may declare far more (or fewer) pixels than its data codes. Decoders then allocate for
the header and pad the missing rows with gray, so a model would predict from padding. Here:

- every format's pixel count and decoded size (which counts the bit depth: a 16-bit pixel is
  two bytes) are bounded from the header alone (`check_size`);
- a PNG's image data is inflated, and counted without being kept, before Pillow decodes it: it
  must hold exactly the rows its header declares (`check_png`);
- a JPEG is decoded by libjpeg-turbo (simplejpeg) in strict mode, where the warnings that libjpeg
  otherwise recovers from by padding or skipping ("premature end of data segment", "extraneous
  bytes") are errors (`decode_jpeg_gray`).
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np

from xray_cls.core.errors import UserInputError
from xray_cls.core.files import path_text

MAX_PIXELS = 178_956_970  # Pillow's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS): about 13,400^2
MAX_DECODED_BYTES = 2**29  # 512 MiB of decoded samples: a 16,000^2 8-bit or an 12,000^2 16-bit gray image fits
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type: gray, RGB, palette, gray+alpha, RGBA
INFLATE_CHUNK = 2**20
BAND_PIXELS = 2**20  # 16-bit, float and DICOM images become 8-bit this many pixels (whole rows) at a time


def check_size(path: Path, width: int, height: int, channels: int = 1, bits: int = 8) -> None:
    """Refuse an image whose header declares more pixels, or more decoded bytes, than the bounds."""
    pixels = width * height
    decoded = pixels * channels * max(1, -(-bits // 8))
    if width < 1 or height < 1:
        raise UserInputError(f"{path_text(path)} is not a readable image (its header declares {width}x{height} pixels)")
    if pixels > MAX_PIXELS or decoded > MAX_DECODED_BYTES:
        raise UserInputError(
            f"{path_text(path)} is too large to decode safely (its header declares {width}x{height} pixels at {bits} bits x "
            f"{channels} channel(s), {decoded / 2**20:,.0f} MiB decoded; the limit is {MAX_PIXELS:,} pixels and "
            f"{MAX_DECODED_BYTES / 2**20:,.0f} MiB)"
        )


def check_png(path: Path, data: bytes) -> None:
    """A PNG's size bounds, and its image data against its header: the inflated IDAT stream must
    hold exactly the scanlines that width, height, bit depth, colour type and interlacing imply."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise UserInputError(f"{path_text(path)} is not a readable image (a PNG without its IHDR header)")
    width, height, bits, color, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if color not in PNG_CHANNELS or bits not in (1, 2, 4, 8, 16):
        raise UserInputError(f"{path_text(path)} is not a readable image (PNG colour type {color} at {bits} bits)")
    check_size(path, width, height, PNG_CHANNELS[color], bits)
    expected = png_scanline_bytes(width, height, bits * PNG_CHANNELS[color], interlace == 1)
    inflated = inflated_size(idat_chunks(path, data), limit=expected + 1)
    if inflated != expected:
        row = 1 + -(-width * bits * PNG_CHANNELS[color] // 8)
        what = (
            f"holds about {inflated // row:,} of the {height:,} rows its header declares"
            if inflated < expected else "holds more image data than its header declares"
        )
        raise UserInputError(f"{path_text(path)} is not a readable image (truncated or padded: its data {what})")


def png_scanline_bytes(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes of filtered scanlines (a filter byte per row) a PNG of this layout inflates to."""
    def rows_bytes(columns: int, rows: int) -> int:
        return rows * (1 + -(-columns * bits_per_pixel // 8)) if columns and rows else 0

    if not interlaced:
        return rows_bytes(width, height)
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))  # Adam7
    return sum(
        rows_bytes(-(-(width - x0) // dx) if width > x0 else 0, -(-(height - y0) // dy) if height > y0 else 0)
        for x0, y0, dx, dy in passes
    )


def idat_chunks(path: Path, data: bytes) -> list[memoryview]:
    """The data of a PNG's IDAT chunks, in order."""
    view, offset, chunks = memoryview(data), 8, []
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if offset + 12 + length > len(data):
            break  # a cut file: counted as missing rows below
        if kind == b"IDAT":
            chunks.append(view[offset + 8 : offset + 8 + length])
        elif kind == b"IEND":
            break
        offset += 12 + length
    if not chunks:
        raise UserInputError(f"{path_text(path)} is not a readable image (a PNG without image data)")
    return chunks


def inflated_size(chunks: list[memoryview], limit: int) -> int:
    """How many bytes the zlib stream split over `chunks` inflates to, counting at most `limit`,
    a megabyte at a time: never held whole."""
    inflater, total = zlib.decompressobj(), 0
    try:
        for chunk in chunks:
            pending = bytes(chunk)
            while pending and total < limit and not inflater.eof:
                total += len(inflater.decompress(pending, INFLATE_CHUNK))
                pending = inflater.unconsumed_tail
            if total >= limit or inflater.eof:
                break
    except zlib.error:
        pass  # corrupt data: what was inflated before it counts, and falls short
    return total


# libjpeg's warnings for data that does not match the frame header; without strict mode it pads
# missing blocks with gray or skips surplus data. A few stray bytes before the end marker are
# common in files from the wild and harmless: up to this many are let through.
STRAY_BYTES = 64
_STRAY = re.compile(r"Corrupt JPEG data: (\d+) extraneous bytes before marker 0xd9")


def decode_jpeg_gray(path: Path, data: bytes, draft_size: int) -> np.ndarray | None:
    """A JPEG decoded as 8-bit gray, scaled down by the DCT exactly as Pillow's `draft` would for
    `draft_size` (so the pixels equal Pillow's), or None for CMYK JPEGs, which are left to Pillow
    once their data has been checked."""
    import simplejpeg

    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as err:
        raise UserInputError(f"{path_text(path)} is not a readable image ({err})") from None
    check_size(path, width, height, 4 if colorspace in ("CMYK", "YCCK") else 1)
    scale = draft_scale(width, height, draft_size)
    cmyk = colorspace in ("CMYK", "YCCK")
    options = {"colorspace": "CMYK" if cmyk else "GRAY", "min_width": -(-width // scale), "min_height": -(-height // scale)}
    try:
        pixels = simplejpeg.decode_jpeg(data, strict=True, **options)
    except ValueError as err:
        stray = _STRAY.search(str(err))
        if not stray or int(stray.group(1)) > STRAY_BYTES:
            raise UserInputError(f"{path_text(path)} is not a readable image (its data does not match its header: {err})") from None
        pixels = simplejpeg.decode_jpeg(data, strict=False, **options)
    return None if cmyk else pixels[..., 0]


def draft_scale(width: int, height: int, draft_size: int) -> int:
    """The DCT scale (1, 2, 4 or 8) that Pillow's JpegImageFile.draft picks for this size."""
    scale = min(width // draft_size, height // draft_size) if draft_size > 0 else 1
    return next((s for s in (8, 4, 2, 1) if scale >= s), 1)
