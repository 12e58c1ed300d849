"""Fuzzing the `.npz` reader (`data.path=`) as a run reads it: the zip's bytes, each `.npy` entry's
bytes re-zipped with a right checksum (so that a mutation reaches numpy's header parser), and the
arrays themselves (dtypes, shapes, labels) as other MedMNIST-style files hold them."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from xray_cls.data import BUNDLED_NPZ

from fuzzing import (
    CaseServer,
    Field,
    Layout,
    assert_handled,
    assert_writes_only_in,
    case_folders,
    data_summary,
    fuzz_cases,
    fuzz_settings,
    mutate,
    mutations,
    snapshot,
    written,
    zip_layout,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

KEYS = [f"{split}_{part}" for split in ("train", "val", "test") for part in ("images", "labels")]


def small_arrays() -> dict[str, np.ndarray]:
    """The bundled file's first images of each class, a few per split."""
    with np.load(BUNDLED_NPZ) as archive:
        arrays = {}
        for split, n in (("train", 24), ("val", 8), ("test", 8)):
            labels = archive[f"{split}_labels"].reshape(-1)
            index = np.concatenate([np.flatnonzero(labels == c)[: n // 2] for c in (0, 1)])
            arrays[f"{split}_images"] = archive[f"{split}_images"][index]
            arrays[f"{split}_labels"] = archive[f"{split}_labels"][index]
    return arrays


def saved(arrays: dict[str, np.ndarray], compressed: bool) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def npy_layout(data: bytes) -> Layout:
    """A .npy entry: its version bytes and header length, the header text, the data."""
    header_end = 10 + int.from_bytes(data[8:10], "little")
    return Layout((Field(6, 1), Field(7, 1), Field(8, 2, "little")), ((8, header_end), (header_end, len(data))), text=False)


def rezipped(archive: bytes, key: str, ops: list[tuple]) -> bytes:
    """The archive with entry `key`'s bytes mutated, written anew (right CRC and sizes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            content = source.read(info)
            if info.filename == f"{key}.npy":
                content = mutate(content, ops)
            target.writestr(info, content)
    return out.getvalue()


def rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=-1)


# (name, key kind, transform, whether the file still says the same thing)
ARRAY_CHANGES: list[tuple[str, str, Callable[[np.ndarray], np.ndarray], bool]] = [
    ("rgb", "images", rgb, True),
    ("one channel axis", "images", lambda a: a[..., None], True),
    ("float in [0, 1]", "images", lambda a: (a / 255).astype(np.float32), True),
    ("float in [0, 255]", "images", lambda a: a.astype(np.float64), True),
    ("16 bits", "images", lambda a: a.astype(np.uint16) * 257, True),
    ("fortran order", "images", np.asfortranarray, True),
    ("labels (N,)", "labels", lambda a: a.reshape(-1), True),
    ("labels as floats", "labels", lambda a: a.astype(np.float32), True),
    ("NaN", "images", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a / 255), False),
    ("infinity", "images", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.inf, a.astype(np.float32)), False),
    ("negative", "images", lambda a: a.astype(np.int16) - 1, False),
    ("out of range floats", "images", lambda a: a.astype(np.float32) * 3, False),
    ("booleans", "images", lambda a: a > 127, False),
    ("five channels", "images", lambda a: np.repeat(a[..., None], 5, axis=-1), False),
    ("one image", "images", lambda a: a[0], False),
    ("a fifth axis", "images", lambda a: a[..., None, None], False),
    ("object array", "images", lambda a: a.astype(object), False),
    ("strings", "images", lambda a: a.astype("U3"), False),
    ("complex", "images", lambda a: a.astype(np.complex64), False),
    ("non-square", "images", lambda a: a[:, :, :20], False),
    ("one pixel wide", "images", lambda a: a[:, :, :1], False),
    ("zero pixels wide", "images", lambda a: a[:, :, :0], False),
    ("no images", "images", lambda a: a[:0], False),
    ("multi-label", "labels", lambda a: np.repeat(a.reshape(-1, 1), 14, axis=1), False),
    ("a negative label", "labels", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, -1, a), False),
    ("a label of 2^31", "labels", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, 2**31, a.astype(np.int64)), False),
    ("three classes", "labels", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, 2, a), False),
    ("fractional labels", "labels", lambda a: a + 0.5, False),
    ("one label fewer", "labels", lambda a: a[1:], False),
    ("object labels", "labels", lambda a: a.astype(object), False),
]


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return small_arrays()


def read(case_server: CaseServer, case: Path, path: Path) -> tuple[bool, dict | None, str]:
    before = snapshot(case)
    outcome = case_server.run("case_entries:read_data", [f"data.path={path}", f"paths.output_dir={case / 'out'}"], case)
    assert_writes_only_in(before, snapshot(case), case, case / "out")
    if not assert_handled(outcome, names=str(path)):
        return False, None, outcome.stderr
    return True, data_summary(outcome), outcome.stderr


@pytest.fixture(scope="module")
def original(case_server: CaseServer, arrays: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> dict:
    case = tmp_path_factory.mktemp("original")
    ok, summary, stderr = read(case_server, case, written(case / "data.npz", saved(arrays, compressed=True)))
    assert ok, stderr
    return summary


def test_the_issues_two_files_are_refused_in_one_line_with_bounded_memory(case_server: CaseServer, arrays: dict, tmp_path: Path) -> None:
    """An object array (pickles) and a 75 KB file whose header claims (60000, 1024, 1024)."""
    cases = case_folders(tmp_path)
    pickled = {**arrays, "train_labels": arrays["train_labels"].astype(object)}
    case = next(cases)
    ok, _, stderr = read(case_server, case, written(case / "pickled.npz", saved(pickled, compressed=False)))
    assert not ok and "train_labels is an object array (pickled Python objects), which is never loaded" in stderr
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (60000, 1024, 1024)})
    lying = io.BytesIO()
    with zipfile.ZipFile(lying, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            entry = io.BytesIO()
            np.save(entry, value)
            archive.writestr(f"{key}.npy", header.getvalue() + bytes(75_000) if key == "train_images" else entry.getvalue())
    case = next(cases)
    path = written(case / "lying.npz", lying.getvalue())
    assert path.stat().st_size < 80_000
    outcome = case_server.run("case_entries:read_data", [f"data.path={path}"], case)
    assert not assert_handled(outcome, names=str(path))
    assert "declares (60000, 1024, 1024) uint8, 58.6 GiB, but the entry holds" in outcome.stderr
    assert outcome.max_rss_mb < 2000  # the server's own imports, no more


def test_mutated_npz_files_are_read_or_refused_in_one_line(case_server: CaseServer, arrays: dict, original: dict, tmp_path: Path,
                                                           pytestconfig: pytest.Config) -> None:
    folders = case_folders(tmp_path)
    archives = {compressed: saved(arrays, compressed) for compressed in (False, True)}

    @fuzz_settings(fuzz_cases(pytestconfig, 40))
    @given(data=st.data())
    def one_case(data: st.DataObject) -> None:
        level = data.draw(st.sampled_from(["file", "entry", "array"]), label="level")
        same = False
        if level == "array":
            name, kind, change, same = data.draw(st.sampled_from(ARRAY_CHANGES), label="change")
            split = data.draw(st.sampled_from(["train", "val", "test"]), label="split")
            changed = {**arrays, f"{split}_{kind}": change(arrays[f"{split}_{kind}"])}
            if data.draw(st.booleans(), label="drop a key"):
                changed.pop(data.draw(st.sampled_from(KEYS), label="dropped"))
                same = False
            content = saved(changed, data.draw(st.booleans(), label="compressed"))
        else:
            archive = archives[data.draw(st.booleans(), label="compressed")]
            if level == "file":
                content = mutate(archive, data.draw(mutations(archive, zip_layout(archive)), label="mutations"))
            else:
                key = data.draw(st.sampled_from(KEYS), label="entry")
                with zipfile.ZipFile(io.BytesIO(archive)) as source:
                    entry = source.read(f"{key}.npy")
                content = rezipped(archive, key, data.draw(mutations(entry, npy_layout(entry)), label="mutations"))
        case = next(folders)
        ok, summary, _ = read(case_server, case, written(case / "data.npz", content))
        if ok and same:
            assert summary == original  # read as the file it was made from

    one_case()
