"""Fuzzing the checkpoint readers of every command that takes one: predict, export, evaluate,
adapt, and resume (`ckpt_path=`). A checkpoint is mutated as bytes (the zip torch writes) or as
the data it holds: any value of its nested dict replaced with a hostile one (0, -1, 2^31, None, a
string, a huge list, a config to instantiate, NaN) or removed, and saved again."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from conftest import SHORT_RUN, compose_config
from fuzzing import (
    HOSTILE_VALUES,
    CaseServer,
    assert_handled,
    assert_writes_only_in,
    case_folders,
    changed_at,
    fuzz_cases,
    fuzz_settings,
    leaf_paths,
    mutate,
    mutations,
    snapshot,
    written,
    zip_layout,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

RUN = ["model=resnet", *SHORT_RUN, "gradcam_samples=0"]
COMMANDS = ["predict", "export", "evaluate", "adapt", "resume"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished short ResNet run (batch norm, for adapt), its results then removed: a run that
    stopped after fitting, which `ckpt_path=` finishes."""
    from xray_cls.train import train

    run_dir = tmp_path_factory.mktemp("fuzz_run") / "run"
    train(compose_config(run_dir, RUN))
    (run_dir / "metrics.json").unlink()
    shutil.rmtree(run_dir / "figures")
    return run_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(4):
        pixels = np.clip(np.random.default_rng(i).normal(120, 40, (40, 40)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"image{i}.png")
    return folder


def command(name: str, ckpt: Path, case: Path, images: Path) -> tuple[str, list[str]]:
    out = f"hydra.run.dir={case / 'out'}"
    if name == "predict":
        return "xray_cls.predict", [f"ckpt={ckpt}", f"input={images}", out]
    if name == "export":
        return "xray_cls.export", [f"ckpt={ckpt}", "format=torchscript", out]
    if name == "evaluate":
        return "xray_cls.evaluate", [f"ckpt={ckpt}", "bootstrap.resamples=0", "gradcam_samples=0", out]
    if name == "adapt":
        return "xray_cls.adapt", [f"ckpt={ckpt}", f"data.root={images}", "method=bn", out]
    return "xray_cls.train", [*RUN, f"ckpt_path={ckpt}"]


def check_result(name: str, case: Path, run: Path) -> None:
    """What each command's success must leave, whole and consistent."""
    out = case / "out"
    if name == "predict":
        with (out / "predictions.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 4 and all(0 <= float(r["probability_pneumonia"]) <= 1 for r in rows)
    elif name == "export":
        sidecar = json.loads((out / "model.json").read_text())
        assert (out / sidecar["model"]).stat().st_size > 0
    elif name == "adapt":
        assert torch.load(out / "adapted.ckpt", weights_only=True)["hyper_parameters"]["adaptation"]["images"] == 4
    else:
        metrics = json.loads(((out if name == "evaluate" else run) / "metrics.json").read_text())
        assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == metrics["n_test"] == 624


def test_every_command_takes_the_unmutated_checkpoint(case_server: CaseServer, run_dir: Path, images: Path, tmp_path: Path) -> None:
    folders = case_folders(tmp_path)
    for name in COMMANDS:
        case = next(folders)
        run = case / "run"
        shutil.copytree(run_dir, run)
        module, args = command(name, run / "checkpoints" / ("last.ckpt" if name == "resume" else "best.ckpt"), case, images)
        outcome = case_server.run(module, args, case, timeout=120)
        assert outcome.exit == 0, name + "\n" + outcome.describe()
        check_result(name, case, run)


def test_mutated_checkpoints_are_taken_or_refused_in_one_line(case_server: CaseServer, run_dir: Path, images: Path, tmp_path: Path,
                                                              pytestconfig: pytest.Config) -> None:
    folders = case_folders(tmp_path)
    raw = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    loaded = torch.load(io.BytesIO(raw), weights_only=True)
    paths = leaf_paths(loaded)

    @fuzz_settings(fuzz_cases(pytestconfig, 30))
    @given(data=st.data())
    def one_case(data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(COMMANDS), label="command")
        if data.draw(st.booleans(), label="as data"):
            path = data.draw(st.sampled_from(paths), label="path")
            delete = data.draw(st.booleans(), label="removed")
            value = None if delete else data.draw(st.sampled_from(HOSTILE_VALUES + (torch.zeros(3), torch.zeros(2, 2, dtype=torch.int8))),
                                                  label="value")
            buffer = io.BytesIO()
            torch.save(changed_at(loaded, path, value, delete), buffer)
            content = buffer.getvalue()
        else:
            content = mutate(raw, data.draw(mutations(raw, zip_layout(raw)), label="mutations"))
        case = next(folders)
        run = case / "run"
        shutil.copytree(run_dir, run)
        ckpt = written(run / "checkpoints" / ("last.ckpt" if name == "resume" else "best.ckpt"), content)
        module, args = command(name, ckpt, case, images)
        before = snapshot(case, images)
        outcome = case_server.run(module, args, case, timeout=120)
        allowed = [case / "out"]
        if name == "resume":
            allowed += [run, case / "outputs"]  # a resumed run writes into its own folder; the command logs in its own
        assert_writes_only_in(before, snapshot(case, images), case, *allowed)
        if assert_handled(outcome):
            check_result(name, case, run)

    one_case()
