"""Image files whose header lies, images too large for their own good, and file names that are not text.

Each file is built here, byte by byte where the lie is in the bytes: a PNG whose IHDR declares
more rows than its data holds, a JPEG whose frame header declares another size than its data codes.
"""

from __future__ import annotations

import csv
import io
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray_cls.core.errors import UserInputError
from xray_cls.data import read_image
from xray_cls.data.dicom import read_dicom
from xray_cls.data.images import to_grayscale

from conftest import SHORT_RUN, make_kermany_folder, run_cli, write_dicom


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def lying_png(width: int, height: int, bits: int, rows: int) -> bytes:
    """A gray PNG whose header declares width x height but whose data holds `rows` rows."""
    row = b"\x00" + bytes(-(-width * bits // 8))
    ihdr = struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, 0)
    data = zlib.compress(row * rows, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def xray_jpeg(height: int = 1416, width: int = 1776) -> bytes:
    pixels = np.clip(np.random.default_rng(0).normal(120, 40, (height, width)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def with_frame_size(jpeg: bytes, height: int, width: int) -> bytes:
    """The JPEG with its SOF0 frame header declaring another size; the coded data unchanged."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9 :]


def test_a_png_declaring_13000_squared_16_bit_pixels_over_10_rows_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(lying_png(13000, 13000, 16, rows=10))
    assert path.stat().st_size < 400
    tracemalloc.start()
    with pytest.raises(UserInputError) as refused:
        read_image(path, 28, "crop")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(refused.value) == (
        f"{path} is not a readable image (truncated or padded: its data holds about 10 of the 13,000 rows its header declares)"
    )
    assert peak < 5 * 2**20  # nothing of the declared 338 MB was allocated


@pytest.mark.parametrize("rows", [150, 301])
def test_a_png_with_missing_or_surplus_rows_is_refused(tmp_path: Path, rows: int) -> None:
    """Pillow decodes the first without complaint, its missing rows black: it would be predicted from padding."""
    path = tmp_path / "cut.png"
    path.write_bytes(lying_png(200, 300, 8, rows=rows))
    with Image.open(path) as image:
        image.load()  # the lie that is caught here
    with pytest.raises(UserInputError, match="truncated or padded: its data holds"):
        read_image(path, 28, "crop")


def test_an_interlaced_png_is_counted_by_its_seven_passes(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (37, 53), dtype=np.uint8)
    path = tmp_path / "interlaced.png"
    # Pillow writes no interlaced PNGs: a pixel-for-pixel Adam7 encoding of the picture.
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b"".join(b"".join(b"\x00" + row.tobytes() for row in pixels[y0::dy, x0::dx]) for x0, y0, dx, dy in passes
                   if pixels[y0::dy, x0::dx].size)
    ihdr = struct.pack(">IIBBBBB", 53, 37, 8, 0, 0, 0, 1)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image), pixels)
    assert read_image(path, 37, "stretch").shape == (37, 37)


@pytest.mark.parametrize(("height", "width", "lie"), [(13000, 13000, "premature end of data segment"), (65000, 1, "extraneous bytes")])
def test_a_jpeg_whose_frame_header_lies_is_refused_not_predicted_from_padding(
    tmp_path: Path, height: int, width: int, lie: str
) -> None:
    real = xray_jpeg()
    path = tmp_path / "lying.jpeg"
    path.write_bytes(with_frame_size(real, height, width))
    with Image.open(path) as image:
        image.draft("L", (28, 28))
        image.load()  # Pillow pads (or skips) without an error: the lie that is caught here
    with pytest.raises(UserInputError, match=f"its data does not match its header: Corrupt JPEG data: .*{lie}"):
        read_image(path, 28, "crop")
    (tmp_path / "real.jpeg").write_bytes(real)
    assert read_image(tmp_path / "real.jpeg", 28, "crop").shape == (28, 28)


def test_a_jpeg_cut_in_half_is_refused(tmp_path: Path) -> None:
    real = xray_jpeg(300, 400)
    path = tmp_path / "half.jpeg"
    path.write_bytes(real[: len(real) // 2])
    with pytest.raises(UserInputError, match="is not a readable image"):
        read_image(path, 28, "crop")


def test_jpegs_decode_to_exactly_pillows_pixels(tmp_path: Path) -> None:
    """libjpeg-turbo in strict mode replaced Pillow's JPEG decoder: at every draft scale the pixels are Pillow's."""
    for i, (height, width) in enumerate([(1416, 1776), (224, 224), (225, 301), (60, 50)]):
        path = tmp_path / f"x{i}.jpeg"
        path.write_bytes(xray_jpeg(height, width))
        for size in (28, 64, 112, 224):
            with Image.open(path) as image:
                image.draft("L", (size, size))
                from xray_cls.data.images import fit_square

                expected = np.asarray(fit_square(image.convert("L"), size, "crop"))
            assert np.array_equal(read_image(path, size, "crop"), expected), (height, width, size)


def test_16_bit_images_become_8_bit_a_band_at_a_time(tmp_path: Path) -> None:
    """A 4000x4000 16-bit image is converted without a float copy of itself (128 MB once, here under 40 MB)."""
    pixels = (np.random.default_rng(2).random((4000, 4000)) * 4095).astype(np.uint16)
    image = Image.fromarray(pixels)
    assert image.mode.startswith("I;16")
    tracemalloc.start()
    converted = to_grayscale(image)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    gray = np.asarray(converted)
    assert peak < 40 * 2**20  # the 16 MB result and 8 MB bands
    expected = np.clip(pixels.astype(np.float64) / 4095 * 255, 0, 255).round().astype(np.uint8)  # the whole-image formula
    assert np.array_equal(gray, expected)


def test_dicoms_become_8_bit_a_band_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xray_cls.data import headers

    pixels = (np.random.default_rng(3).random((3000, 3000)) * 4095).astype(np.uint16)
    path = write_dicom(tmp_path / "big.dcm", pixels, bits_stored=12, RescaleSlope=1.5, RescaleIntercept=-100,
                       WindowCenter=2000, WindowWidth=3000, PhotometricInterpretation="MONOCHROME1")
    tracemalloc.start()
    gray = read_dicom(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # pydicom's pixel data and its uint16 array (18 MB each), the result (9 MB) and 8 MB bands; not
    # the 72 MB float64 copies of the whole image
    assert peak < 70 * 2**20
    monkeypatch.setattr(headers, "BAND_PIXELS", 10**12)  # the whole image as one band: what it was before
    assert np.array_equal(gray, read_dicom(path))


def test_header_size_bounds_count_the_bit_depth(tmp_path: Path) -> None:
    from xray_cls.data.headers import MAX_DECODED_BYTES, check_size

    check_size(tmp_path / "ok.png", 12000, 12000, 1, 16)  # 288 MB decoded: allowed
    with pytest.raises(UserInputError, match="too large to decode safely .*16 bits"):
        check_size(tmp_path / "big.png", 13000, 13000, 2, 16)  # gray + alpha at 16 bits: 676 MB
    with pytest.raises(UserInputError, match="too large to decode safely"):
        check_size(tmp_path / "wide.png", 60000, 60000, 1, 8)
    assert MAX_DECODED_BYTES == 2**29


def junk_jpeg2000_dicom(path: Path) -> Path:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    write_dicom(path, np.zeros((64, 64), np.uint16), bits_stored=12)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"junk" * 100])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_predict_names_each_bad_file_in_one_line_and_fails_after_writing_the_rest(cnn_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.fromarray(np.full((80, 90), 120, np.uint8)).save(folder / "good.png")
    (folder / "lying.jpeg").write_bytes(with_frame_size(xray_jpeg(300, 400), 13000, 13000))
    (folder / "cut.png").write_bytes(lying_png(200, 300, 8, rows=150))
    junk_jpeg2000_dicom(folder / "junk.dcm")
    out = tmp_path / "out"
    done = run_cli([f"ckpt={cnn_run / 'checkpoints' / 'best.ckpt'}", f"input={folder}", f"hydra.run.dir={out}"], cwd=tmp_path,
                   module="xray_cls.predict")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout  # pydicom's logged traceback included
    for name in ("lying.jpeg", "cut.png", "junk.dcm"):
        assert sum(name in line for line in (done.stdout + done.stderr).splitlines() if "skipped:" in line) == 1, name
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: input={folder}: 3 of 4 image file(s) could not be read (each named above); the predictions of the other 1 "
        f"are in {out / 'predictions.csv'}"
    )
    with (out / "predictions.csv").open() as f:
        assert [Path(row["path"]).name for row in csv.DictReader(f)] == ["good.png"]


BAD_NAME = os.fsdecode(b"bad\xff.jpeg")  # a name that is not UTF-8, as another OS may leave it


def test_predict_writes_a_name_that_is_not_utf8_escaped(cnn_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / BAD_NAME).write_bytes(xray_jpeg(100, 120))
    Image.fromarray(np.full((80, 90), 120, np.uint8)).save(folder / "good.png")
    out = tmp_path / "out"
    done = run_cli([f"ckpt={cnn_run / 'checkpoints' / 'best.ckpt'}", f"input={folder}", f"hydra.run.dir={out}"], cwd=tmp_path,
                   module="xray_cls.predict")
    assert done.returncode == 0, done.stderr[-2000:]
    with (out / "predictions.csv").open(encoding="utf-8") as f:
        paths = sorted(row["path"] for row in csv.DictReader(f))
    assert paths == [f"{folder}/bad\\xff.jpeg", f"{folder}/good.png"]


def test_a_training_folder_with_a_name_that_is_not_utf8_trains_and_lists_it_escaped(tmp_path: Path) -> None:
    root = make_kermany_folder(tmp_path / "chest_xray")
    (root / "train" / "NORMAL" / BAD_NAME).write_bytes(xray_jpeg(60, 70))
    run_dir = tmp_path / "run"
    done = run_cli(["data=folder", f"data.root={root}", "model=mlp", "data.image_size=28", *SHORT_RUN, "gradcam_samples=0",
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with (run_dir / "splits.csv").open(encoding="utf-8") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    assert "train/NORMAL/bad\\xff.jpeg" in paths
    assert "Logging error" not in done.stderr and "bad\\xff.jpeg" not in done.stderr
