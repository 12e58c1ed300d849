"""Fuzzing the folder readers: `predict`'s input folder and a Kermany training folder, each given
odd entries a copied or hostile folder holds: FIFOs and links to devices named like images, links
that leave the folder or loop, empty files, folders named like images, names that are not UTF-8,
deep nesting, duplicates and junk."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from conftest import make_kermany_folder
from fuzzing import (
    CaseServer,
    assert_handled,
    assert_writes_only_in,
    case_folders,
    data_summary,
    fuzz_cases,
    fuzz_settings,
    snapshot,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

LAYOUT = [("train", "NORMAL", 12), ("train", "PNEUMONIA", 12), ("test", "NORMAL", 4), ("test", "PNEUMONIA", 4)]
NAMES = st.sampled_from(["a.png", "b.jpeg", "c.dcm", "d.JPG", ".hidden.png", "e.txt", "f"])
# (kind, name, argument): what is put into the folder
ENTRIES = st.one_of(
    st.tuples(st.just("fifo"), NAMES, st.none()),
    st.tuples(st.just("link"), NAMES, st.sampled_from(["/dev/zero", "/dev/null", "/dev/urandom", "../outside.png", "missing.png",
                                                        ".", "..", "/", "/proc/self/mem"])),
    st.tuples(st.just("empty"), NAMES, st.none()),
    st.tuples(st.just("folder"), NAMES, st.none()),
    st.tuples(st.just("not utf-8"), st.just(b"\xff\xfe\x80.png"), st.none()),
    st.tuples(st.just("nested"), NAMES, st.integers(1, 60)),
    st.tuples(st.just("copy"), NAMES, st.none()),
    st.tuples(st.just("text"), NAMES, st.binary(max_size=64)),
)


def add(folder: Path, entry: tuple, image: Path) -> None:
    kind, name, argument = entry
    target = Path(os.fsdecode(os.path.join(os.fsencode(folder), name if isinstance(name, bytes) else os.fsencode(name))))
    if kind == "nested":
        target = folder.joinpath(*["deep"] * argument) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(target):
        return
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "link":
        os.symlink(argument, target)
    elif kind == "empty":
        target.touch()
    elif kind == "folder":
        target.mkdir()
    elif kind == "text":
        target.write_bytes(argument)
    else:  # an image under another name (or a name that is not UTF-8), or deep down
        shutil.copyfile(image, target)


@pytest.fixture(scope="module")
def checkpoint(cnn_run: Path) -> Path:
    """A short CNN run's best checkpoint (conftest's): what predict reads the images with."""
    return cnn_run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "x.png"
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(path)
    return path


def test_odd_predict_input_folders_are_predicted_or_refused_in_one_line(case_server: CaseServer, checkpoint: Path, image: Path,
                                                                       tmp_path: Path, pytestconfig: pytest.Config) -> None:
    folders = case_folders(tmp_path)

    @fuzz_settings(fuzz_cases(pytestconfig, 25))
    @given(entries=st.lists(ENTRIES, min_size=1, max_size=4), within=st.sampled_from(["", "sub"]))
    def one_case(entries: list[tuple], within: str) -> None:
        case = next(folders)
        inputs = case / "input"
        (inputs / "sub").mkdir(parents=True)
        shutil.copyfile(image, inputs / "base.png")
        shutil.copyfile(image, case / "outside.png")
        for entry in entries:
            add(inputs / within, entry, image)
        before = snapshot(case / "input", case / "outside.png")
        outcome = case_server.run("xray_cls.predict", [f"ckpt={checkpoint}", f"input={inputs}", f"hydra.run.dir={case / 'out'}"], case)
        assert snapshot(case / "input", case / "outside.png") == before  # nothing of the input is touched
        assert_handled(outcome)
        if (case / "out" / "predictions.csv").exists():
            with (case / "out" / "predictions.csv").open(newline="") as f:
                rows = list(csv.DictReader(f))
            assert str(inputs / "base.png") in {r["path"] for r in rows}
            assert all(0 <= float(r["probability_pneumonia"]) <= 1 for r in rows)
        else:
            assert outcome.exit == 2

    one_case()


def test_odd_training_folders_are_read_or_refused_in_one_line(case_server: CaseServer, image: Path, tmp_path: Path, pytestconfig: pytest.Config) -> None:
    template = make_kermany_folder(tmp_path / "template", LAYOUT)
    folders = case_folders(tmp_path / "cases")

    @fuzz_settings(fuzz_cases(pytestconfig, 25))
    @given(entries=st.lists(ENTRIES, min_size=1, max_size=4),
           within=st.sampled_from(["", "train", "train/NORMAL", "test/PNEUMONIA", "train/PNEUMONIA/sub"]))
    def one_case(entries: list[tuple], within: str) -> None:
        case = next(folders)
        root = case / "chest_xray"
        shutil.copytree(template, root)
        shutil.copyfile(image, case / "outside.png")
        for entry in entries:
            add(root / within, entry, image)
        before = snapshot(case)
        outcome = case_server.run("case_entries:read_data", ["data=folder", f"data.root={root}", "data.image_size=16",
                                                        "data.min_val_images=4"], case)
        assert_writes_only_in(before, snapshot(case), case)
        if assert_handled(outcome):
            summary = data_summary(outcome)
            assert summary["test"]["images"] >= 8 and summary["train"]["images"] + summary["val"]["images"] >= 24

    one_case()
