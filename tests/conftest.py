"""Shared fixtures: a small Kermany-layout folder written on the fly, and short-run Hydra configs."""

from __future__ import annotations

import inspect
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Two test files run at once (pytest-xdist, one per core). Each with every core's threads, torch's
# OpenMP workers fight over the cores: a test of 3 s alone took 22 s. Each file's process, and the
# commands it starts, take their share of the cores instead.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import numpy as np  # noqa: E402  (after the thread count, which the libraries read when first imported)
import pytest  # noqa: E402
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from xray_cls.runtime.configs import CONFIG_DIR

# A run that touches every stage (fit, val, test on the full test split) in a few seconds: the
# users' debug=fast (3 train and 2 val batches, no bootstrap), with a second epoch so that every
# curve has two points.
SHORT_RUN = ["debug=fast", "trainer.max_epochs=2"]

# (split, class folder as written, number of images); class folders in mixed case on purpose.
FOLDER_LAYOUT = [
    ("train", "NORMAL", 20),
    ("train", "pneumonia", 30),
    ("test", "Normal", 8),
    ("test", "PNEUMONIA", 12),
]


def write_image(path: Path, label: int, index: int) -> None:
    """Images of varied size, mode and format; PNEUMONIA ones brighter, so a model can learn."""
    rng = np.random.default_rng(index)
    height, width = 40 + 7 * (index % 5), 50 + 5 * (index % 3)
    base = 90 + 80 * label  # labels 0, 1, 2: 90, 170, 250
    pixels = np.clip(rng.normal(base, 25, (height, width)), 0, 255).astype(np.uint8)
    kind = index % 4
    if kind == 0:
        Image.fromarray(pixels, "L").save(path.with_suffix(".png"))
    elif kind == 1:
        Image.fromarray(np.stack([pixels] * 3, -1), "RGB").save(path.with_suffix(".jpeg"), quality=95)
    elif kind == 2:
        rgba = np.stack([pixels] * 3 + [np.full_like(pixels, 255)], -1)
        Image.fromarray(rgba, "RGBA").save(path.with_suffix(".png"))
    else:
        Image.fromarray(pixels, "L").save(path.with_suffix(".JPG"), quality=95)


def at_depth(pixels8: np.ndarray, bits: int) -> np.ndarray:
    """The same picture with `bits` of depth, in uint16: what a detector of that depth writes."""
    return (pixels8.astype(np.float64) * (2**bits - 1) / 255).round().astype(np.uint16)


def write_dicom(path: Path, pixels: np.ndarray, bits_stored: int, photometric: str = "MONOCHROME2", **attributes: object) -> Path:
    """An uncompressed (explicit VR little endian) DICOM of unsigned pixels, as a modality writes one;
    `attributes` add DICOM elements by keyword (WindowCenter, VOILUTSequence, ...)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray image, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])  # one length per path
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    ds.PixelData = pixels.astype(np.uint8 if bits_stored <= 8 else "<u2").tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_kermany_folder(root: Path, layout: list[tuple[str, str, int]] = FOLDER_LAYOUT) -> Path:
    """root/{split}/{class}/ with images plus the junk real downloads carry."""
    for split, class_dir, count in layout:
        folder = root / split / class_dir
        folder.mkdir(parents=True, exist_ok=True)
        label = int(class_dir.lower() == "pneumonia")
        for i in range(count):
            write_image(folder / f"img_{i:03d}", label, i + 100 * label)
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (folder / "._img_000.jpeg").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble file
        (folder / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\x00")
    return root


# The patients of each split; patient % 3 says bacteria, virus or normal. NORMAL images are dark,
# VIRAL ones brighter and BACTERIAL ones brightest, so that a model can tell the three apart.
PATIENTS = {"train": range(1, 25), "test": range(100, 110)}


def write_kermany_named_folder(root: Path, extra: tuple[str, ...] = ()) -> dict[str, dict[str, int]]:
    """root/{train,test}/{NORMAL,PNEUMONIA}/ named as Kermany names them, two images a patient;
    returns the image count per split and class."""
    counts: dict[str, dict[str, int]] = {}
    index = 0
    for split, patients in PATIENTS.items():
        counts[split] = {"NORMAL": 0, "BACTERIAL": 0, "VIRAL": 0}
        for patient in patients:
            kind = ("bacteria", "virus", "normal")[patient % 3]
            for scan in range(2):
                index += 1
                if kind == "normal":
                    path = root / split / "NORMAL" / f"IM-{patient:04d}-{scan:04d}"
                    counts[split]["NORMAL"] += 1
                else:
                    path = root / split / "PNEUMONIA" / f"person{patient}_{kind}_{index}"
                    counts[split]["BACTERIAL" if kind == "bacteria" else "VIRAL"] += 1
                path.parent.mkdir(parents=True, exist_ok=True)
                write_image(path, ("normal", "virus", "bacteria").index(kind), index)
    for name in extra:
        write_image(root / "train" / "PNEUMONIA" / name, 1, 7)
    return counts


def image_count(layout: list[tuple[str, str, int]], split: str) -> int:
    return sum(n for s, _, n in layout if s == split)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-cases", default=None, help="cases per reader for the fuzz tests (pytest -m fuzz); CI runs a few dozen")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts a process (the CLI, a server) is `slow`: pytest -m "not slow" leaves
    out those, and the modules that mark themselves slow (services, benchmarks, long runs)."""
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and re.search(r"\brun_cli\(|\bsubprocess\.", inspect.getsource(function)):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def kermany_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_kermany_folder(tmp_path_factory.mktemp("chest_xray"))


def compose_config(output_dir: Path, overrides: list[str], hydra_cfg: bool = False, name: str = "train") -> DictConfig:
    """The real Hydra composition of conf/<name>.yaml, as the CLI does it, with the output folder given."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        overrides = [f"paths.output_dir={output_dir}", *overrides]
        return compose(name, overrides=overrides, return_hydra_config=hydra_cfg)


def run_cli(args: list[str], cwd: Path, timeout: float = 300, module: str = "xray_cls") -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "XDG_CACHE_HOME": str(cwd / ".cache")}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_server(command: list[str], name: str, ready: Callable[[], bool], timeout: float) -> Iterator[None]:
    """Run `command`, a server on 127.0.0.1, until the block ends; enter once ready() holds (an
    OSError meaning "not listening yet"). Its output is in the error when it exits or is never ready."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)

        def output() -> str:
            log.seek(0)
            return log.read()[-3000:]

        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{output()}")
                try:
                    if ready():
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} was not ready after {timeout}s:\n{output()}")
                time.sleep(0.2)
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished short CNN run on the bundled data, its threshold chosen by the Youden rule."""
    from xray_cls.train import train

    run_dir = tmp_path_factory.mktemp("cnn_run")
    train(compose_config(run_dir, ["model=cnn", "threshold_rule=youden", *SHORT_RUN]))
    return run_dir


@pytest.fixture(scope="session")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xray_cls.train import train

    run_dir = tmp_path_factory.mktemp("mlp_run")
    train(compose_config(run_dir, ["model=mlp", *SHORT_RUN]))
    return run_dir


@pytest.fixture(scope="module")
def case_server() -> Iterator[object]:
    """The fuzzer's case server (tests/fuzz_server.py): commands run in forked children, under limits."""
    from fuzzing import CaseServer

    server = CaseServer()
    yield server
    server.close()
