"""The lightning-hydra-template groups: callbacks=, debug= and paths=, composed by Hydra and run by Lightning."""

from __future__ import annotations

from pathlib import Path

import pytest

from xray_cls.core.errors import UserInputError
from xray_cls.core.untrusted import read_epoch_curves
from xray_cls.train import train
from xray_cls.training.trainer import build_trainer

from conftest import SHORT_RUN, compose_config


def test_early_stopping_ends_a_run_that_stops_improving(tmp_path: Path) -> None:
    # min_delta 10 on loss/val: no epoch after the first counts as an improvement.
    overrides = ["callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=1",
                 "callbacks.early_stopping.min_delta=10", "model=mlp", "gradcam_samples=0", *SHORT_RUN,
                 "trainer.max_epochs=6"]
    metrics = train(compose_config(tmp_path, overrides))
    assert metrics["epochs"] == 2  # stopped after epoch 2 of 6
    assert sorted(read_epoch_curves(tmp_path / "curves.csv")) == [1, 2]


def test_checkpoint_monitor_chooses_the_tested_checkpoint(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["checkpoint.monitor=acc/val", "checkpoint.mode=max", "model=mlp",
                                    "gradcam_samples=0", *SHORT_RUN, "trainer.max_epochs=3"])
    assert cfg.callbacks.model_checkpoint.monitor == "acc/val" and cfg.callbacks.model_checkpoint.mode == "max"
    metrics = train(cfg)
    curves = read_epoch_curves(tmp_path / "curves.csv")
    assert metrics["best_checkpoint"]["monitor"] == "acc/val"
    assert metrics["best_checkpoint"]["score"] == pytest.approx(max(row["acc/val"] for row in curves.values()))


def test_a_run_without_its_model_checkpoint_is_refused(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["callbacks=[lr_monitor]", *SHORT_RUN])
    with pytest.raises(UserInputError, match="a run needs exactly one ModelCheckpoint writing to .*checkpoints"):
        build_trainer(cfg, tmp_path)


def test_debug_configs_set_the_trainer(tmp_path: Path) -> None:
    fast = compose_config(tmp_path, ["debug=fast", "trainer.max_epochs=5"])  # a later override still wins
    assert (fast.trainer.max_epochs, fast.trainer.limit_train_batches, fast.bootstrap.resamples) == (5, 3, 0)
    overfit = compose_config(tmp_path, ["debug=overfit"])
    assert overfit.trainer.overfit_batches == 3 and overfit.trainer.max_epochs == 20
    assert compose_config(tmp_path, ["debug=anomaly"]).trainer.detect_anomaly is True
    trainer = build_trainer(overfit, tmp_path)
    assert trainer.overfit_batches == 3


def test_debug_fast_shows_what_a_user_sees(tmp_path: Path) -> None:
    """The tests' short runs use debug=fast: it must not hide the progress bar, whose DDP crash it once hid."""
    from lightning.pytorch.callbacks import ProgressBar

    cfg = compose_config(tmp_path, ["debug=fast"])
    assert cfg.trainer.enable_progress_bar is True
    assert any(isinstance(c, ProgressBar) for c in build_trainer(cfg, Path(cfg.paths.output_dir)).callbacks)


def test_debug_profiler_writes_its_report_to_the_run_folder(tmp_path: Path) -> None:
    overrides = ["debug=profiler", "model=mlp", "gradcam_samples=0", "trainer.limit_train_batches=3",
                 "trainer.limit_val_batches=2"]
    train(compose_config(tmp_path, overrides))
    report = (tmp_path / "fit-profile.txt").read_text()
    assert "run_training_epoch" in report and "Total" in report
    assert (tmp_path / "metrics.json").is_file()


def test_paths_log_dir_holds_the_run_folders(tmp_path: Path) -> None:
    log_dir = tmp_path / "runs"
    for name, args in (("train", []), ("evaluate", ["ckpt=x"]), ("predict", ["ckpt=x", "input=y"]), ("export", ["ckpt=x"])):
        cfg = compose_config(tmp_path, [f"paths.log_dir={log_dir}", *args], hydra_cfg=True, name=name)
        run_dir = Path(cfg.hydra.run.dir)  # resolving it claims the folder, as Hydra does at start-up
        assert run_dir.is_dir() and run_dir.is_relative_to(log_dir), (name, run_dir)
        if name != "train":  # train's runs are <date>/<time> right under log_dir
            assert run_dir.relative_to(log_dir).parts[0] == name
    assert Path(compose_config(tmp_path, [f"paths.log_dir={log_dir}"], hydra_cfg=True).hydra.sweep.dir).is_relative_to(log_dir / "multirun")
