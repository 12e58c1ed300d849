"""End to end: real Hydra composition, Lightning Trainer, torchmetrics and TensorBoard event files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from xray_cls.train import train

from conftest import FOLDER_LAYOUT, SHORT_RUN, compose_config, image_count, run_cli

EPOCHS = 2  # SHORT_RUN's trainer.max_epochs
CURVE_TAGS = ["loss/train", "loss/val", "acc/train", "acc/val"]


def load_events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    return events.Reload()


def assert_confusion_matrix_adds_up(metrics: dict[str, Any], n_test: int, n_positive: int) -> None:
    cm = metrics["confusion_matrix"]
    (tn, fp), (fn, tp) = cm["matrix"]
    assert (cm["tn"], cm["fp"], cm["fn"], cm["tp"]) == (tn, fp, fn, tp)
    assert tn + fp + fn + tp == metrics["n_test"] == n_test
    assert fn + tp == n_positive
    # torchmetrics' scores must agree with the matrix they came with.
    test = metrics["test"]
    assert test["accuracy"] == pytest.approx((tn + tp) / n_test, abs=1e-6)
    assert test["recall"] == pytest.approx(tp / (tp + fn), abs=1e-6)
    assert test["specificity"] == pytest.approx(tn / (tn + fp), abs=1e-6)
    if tp + fp:
        assert test["precision"] == pytest.approx(tp / (tp + fp), abs=1e-6)
    assert 0 <= test["auroc"] <= 1


def test_default_run_through_the_cli(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli([*SHORT_RUN, "bootstrap.resamples=200", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Test results: 624 images" in result.stdout
    assert "total params" in result.stdout + result.stderr

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert_confusion_matrix_adds_up(metrics, n_test=624, n_positive=390)
    assert metrics["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert metrics["test_ci"]["confidence"] == 0.95
    for key in ("accuracy", "recall", "specificity", "auroc"):
        low, high = metrics["test_ci"][key]
        assert low <= metrics["test"][key] <= high, key
    assert "95% CI" in result.stdout
    assert metrics["epochs"] == EPOCHS
    assert metrics["params"]["total"] == metrics["params"]["trainable"] > 0
    for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", metrics["best_checkpoint"]["path"], "train.log"):
        assert (run_dir / name).is_file(), name
    for name in ("confusion_matrix", "roc_curve", "pr_curve"):
        assert (run_dir / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = OmegaConf.load(run_dir / "config.yaml")  # resolved: no interpolation left
    assert config.data.batch_size == 32 and config.trainer.max_epochs == EPOCHS
    assert config.paths.output_dir == str(run_dir)

    events = load_events(run_dir)
    tags = events.Tags()
    for tag in CURVE_TAGS:
        assert len(events.Scalars(tag)) == EPOCHS, tag
    assert any(tag.startswith("lr-") for tag in tags["scalars"])
    assert events.Scalars("test/accuracy")[0].value == pytest.approx(metrics["test"]["accuracy"])
    assert {"test/confusion_matrix", "test/roc_curve", "test/pr_curve"} <= set(tags["images"])
    layout = events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    assert all(tag.encode() in layout for tag in CURVE_TAGS)


def test_run_logs_its_hparams_with_metrics(tmp_path: Path) -> None:
    train(compose_config(tmp_path, [*SHORT_RUN, "model=mlp", "model.dropout=0.25", "data.aug=mild"]))
    content = load_events(tmp_path).PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert hparams["model"] == "mlp"
    assert hparams["dropout"] == 0.25
    assert hparams["aug"] == "mild"
    assert hparams["batch_size"] == 32
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {"hparams/test_accuracy", "hparams/test_auroc", "hparams/acc_val"} <= metric_tags


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=mlp"],
        ["model=cnn", "model.dropout=0"],
        ["data.aug=mild"],
        ["data.aug=strong", "model=mlp", "model.dropout=0"],
        ["model=resnet", "loss.pos_weight=balanced", "threshold_rule=youden"],
    ],
    ids=["mlp", "cnn-no-dropout", "aug-mild", "aug-strong", "resnet-balanced"],
)
def test_study_variants_run_end_to_end(tmp_path: Path, overrides: list[str]) -> None:
    cfg = compose_config(tmp_path, [*SHORT_RUN, *overrides])
    returned = train(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == json.loads(json.dumps(returned))
    assert_confusion_matrix_adds_up(written, n_test=624, n_positive=390)
    assert written["hparams"]["model"] == cfg.model._target_.rsplit(".", 1)[-1].lower()
    assert written["hparams"]["dropout"] == cfg.model.dropout
    assert written["hparams"]["aug"] == cfg.data.aug
    rule = written["threshold_rule"]
    assert rule["rule"] == cfg.threshold_rule and written["threshold"] == rule["threshold"]
    if rule["rule"] == "fixed":
        assert written["threshold"] == cfg.threshold


def test_folder_run_end_to_end(tmp_path: Path, kermany_root: Path) -> None:
    overrides = [*SHORT_RUN, "data=folder", f"data.root={kermany_root}", "data.image_size=32", "data.batch_size=8",
                 f"data.cache_dir={tmp_path / 'cache'}"]
    metrics = train(compose_config(tmp_path, overrides))
    n_test = image_count(FOLDER_LAYOUT, "test")
    assert_confusion_matrix_adds_up(metrics, n_test=n_test, n_positive=12)
    assert metrics["hparams"]["image_size"] == 32
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()


def test_the_seed_makes_a_run_repeatable(tmp_path: Path) -> None:
    overrides = [*SHORT_RUN, "data.aug=strong", "seed=7"]
    first = train(compose_config(tmp_path / "a", overrides))
    second = train(compose_config(tmp_path / "b", overrides))
    other = train(compose_config(tmp_path / "c", [*overrides, "seed=8"]))
    assert first["test"] == second["test"]
    assert first["last_epoch"] == second["last_epoch"]
    assert first["last_epoch"] != other["last_epoch"]


def test_ddp_on_two_cpu_processes_counts_each_test_image_once(tmp_path: Path) -> None:
    import lightning as L
    import numpy as np

    from xray_cls.data import BUNDLED_NPZ, PneumoniaMNISTDataModule
    from xray_cls.models.classifier import XrayClassifier

    # An odd test set: a sampler that pads the two shares with a repeat would count 624, not 623.
    arrays = dict(np.load(BUNDLED_NPZ))
    arrays["test_images"], arrays["test_labels"] = arrays["test_images"][:623], arrays["test_labels"][:623]
    npz = tmp_path / "odd_test.npz"
    np.savez(npz, **arrays)
    run_dir = tmp_path / "ddp"
    args = [*SHORT_RUN, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"data.path={npz}"]
    result = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert_confusion_matrix_adds_up(metrics, n_test=623, n_positive=int(arrays["test_labels"].sum()))

    # The same checkpoint evaluated by a single process gives the same matrix and scores.
    module = XrayClassifier.load_from_checkpoint(run_dir / metrics["best_checkpoint"]["path"], map_location="cpu")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.test(module, datamodule=PneumoniaMNISTDataModule(path=str(npz)), verbose=False)
    assert module.test_results["confusion_matrix"] == metrics["confusion_matrix"]["matrix"]
    for key, value in module.test_results["scores"].items():
        assert value == pytest.approx(metrics["test"][key], abs=1e-6), key


@pytest.mark.parametrize(
    "precision,accelerator,expected",
    [("auto", "cpu", "32-true"), ("auto", "auto", "32-true"), ("32-true", "auto", "32-true"), ("16-mixed", "cpu", "16-mixed")],
)
def test_precision_auto_is_full_precision_without_a_gpu(precision: str, accelerator: str, expected: str) -> None:
    import torch
    from omegaconf import OmegaConf

    from xray_cls.training.trainer import supported_precision

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto resolves to mixed precision here")
    assert supported_precision(OmegaConf.create({"precision": precision, "accelerator": accelerator})) == expected


def test_a_local_folder_run_shows_no_library_noise(kermany_root: Path, tmp_path: Path) -> None:
    """On a machine with SLURM installed (a fake `srun` on PATH), outside a SLURM job, with the
    progress bar on and warnings shown: no `srun` hint, no torchmetrics warning from a one-class
    sanity check, no `v_num` in the bar."""
    from hydra.utils import instantiate

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS" and not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", XDG_CACHE_HOME=str(tmp_path / "cache"))
    data = ["data=folder", f"data.root={kermany_root}", f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=4",
            "data.val_fraction=0.4"]

    # The conditions are real: Lightning does warn about this srun, and the sanity check's two val
    # batches hold NORMAL images only.
    plain = subprocess.run([sys.executable, "-c", "import lightning; lightning.Trainer(accelerator='cpu', logger=False)"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert "`srun` command is available" in plain.stderr
    datamodule = instantiate(compose_config(tmp_path, data).data, seed=42)
    datamodule.setup("fit")
    assert datamodule.splits["val"].labels[:8].sum() == 0

    args = [*data, "model=mlp", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "gradcam_samples=0",
            "bootstrap.resamples=10", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-m", "xray_cls", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    console = result.stdout + result.stderr
    assert "Epoch 0" in console  # the progress bar was drawn
    for noise in ("srun", "No positive samples", "v_num"):
        assert noise not in console


@pytest.mark.parametrize("refresh_seconds,expected_draws", [(3600.0, 3), (1e-9, 10)])
def test_progress_bar_draws_by_time_and_always_the_last_batch(
    refresh_seconds: float, expected_draws: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real fit of 2 epochs of 5 batches: a bar that may redraw once an hour draws the first batch
    and the last of each epoch; one that may redraw at any time draws every batch."""
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.demos.boring_classes import BoringModel

    from xray_cls.training.callbacks import ProgressBar

    bar = ProgressBar(refresh_seconds)
    drawn: list[int] = []
    lightning_bar = next(c for c in type(bar).__mro__ if c in (RichProgressBar, TQDMProgressBar))  # Lightning's bar, which draws
    monkeypatch.setattr(lightning_bar, "on_train_batch_end", lambda _bar, _trainer, _module, _out, _batch, i: drawn.append(i))
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=5, limit_val_batches=2, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[bar])
    trainer.fit(BoringModel())
    assert len(drawn) == expected_draws
    assert drawn.count(4) == 2  # the last batch of both epochs


def test_progress_bar_is_configured_from_conf_and_hidden_on_request(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ProgressBar

    from xray_cls.core.errors import UserInputError
    from xray_cls.runtime.console import run_error
    from xray_cls.training.trainer import build_trainer

    def bars(overrides: list[str]) -> list[Any]:
        cfg = compose_config(tmp_path, overrides)
        return [c for c in build_trainer(cfg, Path(cfg.paths.output_dir)).callbacks if isinstance(c, ProgressBar)]

    assert len(bars([])) == 1
    assert bars(["trainer.enable_progress_bar=false"]) == []
    assert len(bars(["callbacks=[model_checkpoint]"])) == 1  # a callbacks list without it still gets the bar
    with pytest.raises(Exception) as refused:  # Hydra's instantiate wraps it; the CLI prints the UserInputError
        bars(["callbacks.progress_bar.refresh_seconds=0"])
    assert isinstance(run_error(refused.value), UserInputError)
    assert "callbacks.progress_bar.refresh_seconds=0" in str(run_error(refused.value))


# A thread fills its arena with 200 MB of small blocks and frees all but the last, which pins the
# heap's top, so that only malloc_trim can hand the pages back. Prints RssAnon (kB) before and after.
TRIM_PROBE = """
import sys, threading
from pathlib import Path
from xray_cls.core.memory import return_freed_memory
def anon_kb():
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssAnon:"))
def fill_and_free():
    blocks = [bytearray(64 * 1024) for _ in range(3200)]
    del blocks[:-1]
    before = anon_kb()
    if sys.argv[1] == "trim":
        return_freed_memory()
    print(before, anon_kb())
thread = threading.Thread(target=fill_and_free)
thread.start()
thread.join()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc arenas only")
def test_return_freed_memory_hands_a_threads_freed_blocks_back() -> None:
    """What keeps a large folder's run from growing after fit: memory freed in a thread's arena goes back."""

    def freed_mb(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", TRIM_PROBE, mode], capture_output=True, text=True, check=True)
        before, after = map(int, done.stdout.split())
        return (before - after) / 1024

    assert freed_mb("keep") < 50  # the probe's freed blocks do stay without it
    assert freed_mb("trim") > 150


@pytest.mark.parametrize(("every_seconds", "expect_every_batch"), [(0.0, True), (3600.0, False)])
def test_freed_memory_is_returned_after_batches_at_most_as_often_as_configured(
    monkeypatch: pytest.MonkeyPatch, every_seconds: float, expect_every_batch: bool
) -> None:
    """A real fit of 2 epochs (5 train and 2 val batches each, and the sanity check's 2)."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    import xray_cls.training.callbacks as callbacks

    returned: list[int] = []
    monkeypatch.setattr(callbacks, "return_freed_memory", lambda: returned.append(1))
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=5, limit_val_batches=2, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        callbacks=[callbacks.ReturnFreedMemory(every_seconds)])
    trainer.fit(BoringModel())
    assert len(returned) == (2 + 2 * (5 + 2) if expect_every_batch else 0)
