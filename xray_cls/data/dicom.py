"""Reading a DICOM file as 8-bit gray, displayed as its own header says (modality LUT or rescale,
VOI LUT or window, MONOCHROME1 inverted), a band of rows at a time."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from xray_cls.core.errors import UserInputError
from xray_cls.core.files import path_text
from xray_cls.data import headers

log = logging.getLogger(__name__)


def read_dicom(path: Path) -> np.ndarray:
    """A DICOM file's image as uint8 (H, W), displayed as its own header says (`dicom_gray`)."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path)
        frames = int(dataset.get("NumberOfFrames") or 1)
        if frames > 1:
            raise UserInputError(f"{path_text(path)} holds {frames} frames; expected a DICOM with one image")
        headers.check_size(
            path, int(dataset.get("Columns", 0)), int(dataset.get("Rows", 0)),
            int(dataset.get("SamplesPerPixel") or 1), int(dataset.get("BitsAllocated") or 8),
        )
        return dicom_gray(dataset, dataset.pixel_array)
    except UserInputError:
        raise
    except pydicom.errors.InvalidDicomError:
        raise UserInputError(f"{path_text(path)} is not a readable image (no DICOM header: 'DICM' after a 128-byte preamble)") from None
    except PermissionError as err:
        raise UserInputError(f"{path_text(path)} is not a readable image ({err})") from None
    except Exception as err:  # noqa: BLE001  a hostile file can fail anywhere in pydicom; never a traceback
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        if "missing dependencies" in lines[0]:  # pydicom lists the plugins that would decode it, one a line
            raise UserInputError(
                f"{path_text(path)}: {lines[0]} {'; '.join(lines[1:])} (pip install one of them)"
            ) from None
        raise UserInputError(f"{path_text(path)} is not a readable image ({' '.join(lines)[:300]})") from None


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
    ends = apply_modality_lut(ends, dataset)
    voi_lut = dataset.get("VOILUTSequence")
    use_voi_lut = bool(voi_lut and "LUTDescriptor" in voi_lut[0] and "LUTData" in voi_lut[0])
    use_window = not use_voi_lut and dataset.get("WindowCenter") is not None and dataset.get("WindowWidth") is not None
    if use_voi_lut:
        ends = np.array([0, 2 ** int(voi_lut[0].LUTDescriptor[2]) - 1])
    elif use_window:
        ends = apply_windowing(np.array([-np.inf, np.inf]), dataset)  # the window's output range
    low, high = float(ends.min()), float(ends.max())

    def displayed(band: np.ndarray) -> np.ndarray:
        values = apply_modality_lut(band, dataset)
        if use_voi_lut:
            values = apply_voi(values.round().astype(np.int64) if values.dtype.kind == "f" else values, dataset)
        elif use_window:
            values = apply_windowing(values, dataset)
        gray = values.astype(np.float64, copy=values is band)  # pydicom's own result is scaled in place
        gray -= low
        gray /= max(high - low, 1e-12)
        np.clip(gray, 0, 1, out=gray)
        gray *= 255
        if photometric == "MONOCHROME1":  # 0 is white
            np.subtract(255, gray, out=gray)
        return np.round(gray, out=gray)

    # A band of rows at a time: the float copies of a 6000x6000 image would cost more than 1 GB.
    gray = np.empty(pixels.shape, dtype=np.uint8)
    rows = max(1, headers.BAND_PIXELS // max(pixels.shape[1], 1))
    for top in range(0, pixels.shape[0], rows):
        gray[top : top + rows] = displayed(pixels[top : top + rows])
    return gray
