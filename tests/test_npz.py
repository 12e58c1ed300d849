"""The `.npz` reader (`data.path=`): MedMNIST-style files of every kind a user brings read as the
networks take them, and files that lie or hold what no picture is refused in one line, before
anything is allocated. Each case the fuzzer found (docs/development.md) has its test here."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray_cls.core.errors import UserInputError
from xray_cls.data import BUNDLED_NPZ, read_npz


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    with np.load(BUNDLED_NPZ) as archive:
        return {key: archive[key][:20] for key in archive.files}


def save(path: Path, arrays: dict[str, np.ndarray], **changes: np.ndarray) -> Path:
    np.savez(path, **{**arrays, **changes})
    return path


def refused(path: Path) -> str:
    with pytest.raises(UserInputError) as error:
        read_npz(path)
    message = str(error.value)
    assert message.startswith(f"data.path: {path}") and "\n" not in message
    return message


def test_an_object_array_is_never_unpickled(arrays: dict, tmp_path: Path) -> None:
    path = save(tmp_path / "pickled.npz", arrays, train_labels=arrays["train_labels"].astype(object))
    assert "train_labels is an object array (pickled Python objects), which is never loaded" in refused(path)


def test_a_header_claiming_58_gib_is_refused_before_anything_is_allocated(arrays: dict, tmp_path: Path) -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (60000, 1024, 1024)})
    path = tmp_path / "lying.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            entry = io.BytesIO()
            np.save(entry, value)
            archive.writestr(f"{key}.npy", header.getvalue() + bytes(75_000) if key == "train_images" else entry.getvalue())
    assert path.stat().st_size < 80_000
    tracemalloc.start()
    message = refused(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "the header of train_images declares (60000, 1024, 1024) uint8, 58.6 GiB, but the entry holds" in message
    assert peak < 2**22


def central_record(data: bytes, key: str) -> int:
    """Where the central directory record of entry `key` starts."""
    return next(i for i in range(len(data)) if data.startswith(b"PK\x01\x02", i) and data[i + 46 : i + 46 + len(key)] == key.encode())


def compressed(path: Path, arrays: dict[str, np.ndarray]) -> bytearray:
    np.savez_compressed(path, **arrays)
    return bytearray(path.read_bytes())


def test_an_entry_claiming_more_than_deflate_can_expand_to_is_refused(arrays: dict, tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    data = compressed(path, arrays)
    record = central_record(data, "train_images.npy")
    data[record + 24 : record + 28] = (2**32 - 1).to_bytes(4, "little")  # its uncompressed size
    path.write_bytes(bytes(data))
    assert "more than deflate can expand to" in refused(path)


def test_an_entry_claiming_more_compressed_data_than_the_file_holds_is_refused(arrays: dict, tmp_path: Path) -> None:
    """Found in review: with both sizes raised together, deflate's ratio allowed a 49 GiB allocation for a 1.5 KB file."""
    path = tmp_path / "data.npz"
    data = compressed(path, arrays)
    record = central_record(data, "train_images.npy")
    data[record + 20 : record + 24] = (50_000_000).to_bytes(4, "little")  # compressed size
    data[record + 24 : record + 28] = (2**32 - 1).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert "of data that the file does not hold" in refused(path)


def test_a_deflate_stream_damaged_after_its_header_is_one_line(arrays: dict, tmp_path: Path) -> None:
    """Found in review: zlib.error escaped as a traceback."""
    path = tmp_path / "data.npz"
    data = compressed(path, {**arrays, "train_images": np.random.default_rng(0).integers(0, 256, (200, 28, 28), dtype=np.uint8),
                             "train_labels": np.zeros((200, 1), np.uint8)})
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("train_images.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2 : start + info.compress_size // 2 + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    message = refused(path)
    assert "is not a readable .npz file" in message


def test_integer_pixels_are_scaled_by_each_images_own_depth(arrays: dict, tmp_path: Path) -> None:
    """Found in review: the depth came from a split's brightest pixel, so one picture read differently in train and test."""
    twelve = (arrays["test_images"].astype(np.uint16) * 4095 // 255)
    split = read_npz(save(tmp_path / "data.npz", arrays, test_images=twelve, train_images=twelve[:20]))
    assert np.array_equal(split["test"].source[:20].numpy(), split["train"].source.numpy())


def test_a_npy_header_length_of_one_is_one_line(arrays: dict, tmp_path: Path) -> None:
    """Found by the fuzzer: numpy's header parser raised tokenize.TokenError."""
    entry = io.BytesIO()
    np.save(entry, arrays["train_images"])
    data = bytearray(entry.getvalue())
    data[8:10] = (1).to_bytes(2, "little")
    path = save(tmp_path / "data.npz", {k: v for k, v in arrays.items() if k != "train_images"})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("train_images.npy", bytes(data))
    assert "train_images has no readable .npy header" in refused(path)


def test_rgb_images_become_gray_as_a_folders_do(arrays: dict, tmp_path: Path) -> None:
    """MedMNIST's RGB sets are (N, H, W, 3): Pillow's luma, as for a colour image in a folder."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (*arrays["train_images"].shape, 3), dtype=np.uint8)
    split = read_npz(save(tmp_path / "rgb.npz", arrays, train_images=rgb))["train"]
    expected = np.stack([np.asarray(Image.fromarray(image, "RGB").convert("L")) for image in rgb])
    assert np.array_equal(split.source[:, 0].numpy(), expected)


@pytest.mark.parametrize("change", [
    lambda a: (a / 255).astype(np.float32),  # floats in [0, 1]
    lambda a: a.astype(np.float64),  # floats in [0, 255]
    lambda a: a.astype(np.uint16) * 257,  # 16 bits
    lambda a: a[..., None],  # a channel axis
    np.asfortranarray,
], ids=["float01", "float255", "uint16", "channel", "fortran"])
def test_other_pixel_types_read_as_the_same_picture(arrays: dict, tmp_path: Path, change) -> None:
    split = read_npz(save(tmp_path / "data.npz", arrays, test_images=change(arrays["test_images"])))["test"]
    assert np.array_equal(split.source[:, 0].numpy(), arrays["test_images"])


@pytest.mark.parametrize(("key", "change", "message"), [
    ("train_images", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a / 255), "holds NaN or infinite pixel values"),
    ("train_images", lambda a: a.astype(np.int16) - 1, "holds negative pixel values"),
    ("train_images", lambda a: a.astype(np.float32) * 300, "holds pixel values from 0 to 7.17e+04; expected [0, 1] or [0, 255]"),
    ("train_images", lambda a: a > 127, "holds true/false values"),
    ("train_images", lambda a: np.repeat(a[..., None], 5, -1), "has shape (20, 28, 28, 5); expected (N, H, W) or (N, H, W, 1 or 3)"),
    ("train_images", lambda a: a.astype("U3"), "holds <U3 values; expected numbers"),
    ("train_images", lambda a: a[:, :, :0], "train_images are empty pictures"),
    ("train_labels", lambda a: np.repeat(a, 14, axis=1), "has 14 labels per image (a multi-label set such as ChestMNIST)"),
    ("train_labels", lambda a: a + 0.5, "holds labels that are not whole numbers"),
    ("val_labels", lambda a: a[1:], "has 20 val images and 19 labels; expected one label per image"),
    ("train_labels", lambda a: a.astype(np.int64) - 1, "holds labels from -1 to 1; expected labels 0 to at most 63"),
])
def test_what_no_picture_or_label_is_refused_in_one_line(arrays: dict, tmp_path: Path, key: str, change, message: str) -> None:
    from xray_cls.data import PneumoniaMNISTDataModule

    path = save(tmp_path / "data.npz", arrays, **{key: change(arrays[key])})
    with pytest.raises(UserInputError) as error:
        PneumoniaMNISTDataModule(path=str(path)).setup("fit")
    assert message in str(error.value) and str(error.value).startswith(f"data.path: {path}")


def test_non_square_images_are_fitted_as_a_folders(arrays: dict, tmp_path: Path) -> None:
    from xray_cls.data import PneumoniaMNISTDataModule

    path = save(tmp_path / "data.npz", arrays, **{f"{s}_images": arrays[f"{s}_images"][:, :, 4:24] for s in ("train", "val", "test")})
    datamodule = PneumoniaMNISTDataModule(path=str(path))
    datamodule.setup("fit")
    assert datamodule.image_size == 20  # the centred square of the short side
    assert np.array_equal(datamodule.splits["test"].source[:, 0].numpy(), arrays["test_images"][:, 4:24, 4:24])


def test_an_empty_split_is_refused_before_a_run_starts(arrays: dict, tmp_path: Path) -> None:
    from xray_cls.data import PneumoniaMNISTDataModule

    path = save(tmp_path / "data.npz", arrays, val_images=arrays["val_images"][:0], val_labels=arrays["val_labels"][:0])
    with pytest.raises(UserInputError, match="the val split has no images"):
        PneumoniaMNISTDataModule(path=str(path)).setup("fit")
