"""`python -m xray_cls`: one run, in the five steps of `train`.

1. prepare the run folder: a new one, or the folder of the run it resumes;
2. build the data and the model (the network sized to the data);
3. fit;
4. make the choices on val (the tested weights' temperature and threshold, written into the checkpoints);
5. test and report.

Everything a run writes goes under its Hydra output folder (`outputs/<date>/<time>/` by default):
config.yaml, checkpoints/, curves.csv, figures/, metrics.json, the log, and each logger's
files (tensorboard/ by default; csv/, wandb/ with logger=csv or wandb).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from xray_cls.core.errors import RunInterrupted
from xray_cls.core.files import write_csv, write_json, write_text
from xray_cls.core.legacy_names import forwarding
from xray_cls.core.options import check_options, number
from xray_cls.core.task import task_of_run
from xray_cls.data.options import DATA
from xray_cls.metrics.options import CHOICES, SCORING
from xray_cls.models.options import MODEL
from xray_cls.runtime.configs import CONFIG_DIR, in_multirun
from xray_cls.runtime.console import error_line, exit_on_user_error, quiet_libraries, run_error
from xray_cls.training.losses import check_for_classes, class_weights, label_smoothing, positive_class_weight
from xray_cls.training.options import TRAINING
from xray_cls.training.resume import RunFolder, locate_run_folder, log_to_run_folder, stop_advice

log = logging.getLogger(__name__)


SPLITS_COLUMNS = ["path", "split", "label", "patient"]  # splits.csv: which image each split holds


@dataclass
class Fitted:
    """What fitting leaves for the steps after it."""

    trainer: Any
    last_epoch: dict[str, float]
    train_seconds: float  # of the whole run: earlier starts, up to their last checkpoint, and this one
    seconds_before: float  # of the earlier starts alone (0 for a run not resumed)
    hparams: dict[str, Any]
    best_path: Path | None = None  # set by make_val_choices
    tested: str = "best"  # whose weights the test saw: the best checkpoint's or the last epoch's


def train(cfg: DictConfig) -> dict[str, Any]:
    """One run: fit, make the val choices, test the tested weights, write metrics.json. Returns the metrics.

    With `ckpt_path` set, an interrupted run continues in its own folder from that checkpoint; so
    does the run of a SLURM job that the scheduler restarted (see resume.requeued_checkpoint).
    """
    check_run_options(cfg)  # a bad value is refused before anything is read or written
    quiet_libraries()
    folder = locate_run_folder(cfg)
    with holding(folder.path), stop_advice(folder):  # two runs, or two resumes of one run, cannot both go on in one folder
        prepare_run_folder(cfg, folder)
        datamodule, module = build_data_and_model(cfg, folder)
        fitted = fit(cfg, folder, datamodule, module)
        choices, val = make_val_choices(cfg, fitted, module, datamodule)
        return test_and_report(cfg, folder, fitted, module, datamodule, choices, val)


OPTIONS = [*DATA, *SCORING, *CHOICES, *MODEL, *TRAINING, number("gradcam_samples", 0, integer=True), number("seed", integer=True)]


def check_run_options(cfg: DictConfig) -> None:
    """Every option of a run, and those that depend on how many classes its task has (an .npz's
    own labels are checked again once it is read)."""
    check_options(cfg, OPTIONS)
    task = task_of_run(cfg.task, cfg.data)
    if not task.binary:
        check_for_classes(cfg, len(task.classes))


@contextlib.contextmanager
def holding(path: Path) -> Any:
    """The run folder held by the first process; DDP's others write into the folder it holds."""
    from lightning.pytorch.utilities import rank_zero_only

    from xray_cls.runtime.run_folder import held

    with held(path) if rank_zero_only.rank == 0 else contextlib.nullcontext():
        yield


def prepare_run_folder(cfg: DictConfig, folder: RunFolder) -> None:
    """A new run's folder gets its config.yaml, once it is known to hold no other run (an explicit
    hydra.run.dir that does is refused); a resumed run's folder is kept as it is."""
    from lightning.pytorch.utilities import rank_zero_only

    from xray_cls.runtime.run_folder import refuse_results

    if folder.resume_from is not None or rank_zero_only.rank != 0:  # DDP starts the other processes with the same config
        return
    refuse_results(folder.path, ["metrics.json", "checkpoints"], "a run", "run")
    write_text(folder.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def build_data_and_model(cfg: DictConfig, folder: RunFolder) -> tuple[Any, Any]:
    """The seeded data, read so that the network can be sized to it, and the LightningModule."""
    from lightning.pytorch.utilities import rank_zero_only

    from xray_cls.models.classifier import XrayClassifier
    from xray_cls.models.pretrained import IMAGENET_GRAY, Pretraining, load_weights, pretrained_backbone
    from xray_cls.reports.network_summary import network_summary

    datamodule = read_data(cfg)
    num_classes = len(datamodule.class_names)  # an .npz's labels may add classes to the task's
    if rank_zero_only.rank == 0 and not (folder.path / "splits.csv").exists():  # a resumed run keeps its own
        columns = SPLITS_COLUMNS + (["fold"] if getattr(datamodule, "folds", None) else [])  # data.folds: cross-validation
        write_csv(folder.path / "splits.csv", datamodule.split_rows(), columns)
    net_cfg = {**OmegaConf.to_container(cfg.model, resolve=True), "in_channels": datamodule.in_channels,
               "image_size": datamodule.image_size}
    pretraining = Pretraining.pop_from(net_cfg)  # model.weights, ...: how to start, not what to build
    backbone = None
    if folder.resume_from is not None:  # as the run started: no weights file is read again
        prep = folder.checkpoint["hyper_parameters"]["preprocessing"]
        if prep.get("normalization", "train") != "train":
            datamodule.use_normalization(prep["normalization"], prep["mean"], prep["std"])
    else:
        backbone = pretrained_backbone(pretraining, net_cfg, datamodule.image_size, datamodule.in_channels)
        if backbone is not None:  # pretrained filters expect the pixels scaled as in their training
            datamodule.use_normalization("pretraining", backbone.mean, backbone.std)
        elif pretraining.weights is not None:
            datamodule.use_normalization("imagenet", *IMAGENET_GRAY)
    if num_classes > 2:  # two classes' networks keep the arguments of earlier checkpoints
        net_cfg["num_classes"] = num_classes
    train_counts = datamodule.splits["train"].class_counts(num_classes)
    if folder.resume_from is not None:
        continue_run(cfg, folder, net_cfg)
    module = XrayClassifier(
        net=net_cfg,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        threshold=cfg.threshold,
        pos_weight=positive_class_weight(cfg.loss.pos_weight, train_counts) if num_classes == 2 else None,
        class_weight=class_weights(cfg.loss.get("class_weight"), train_counts) if num_classes > 2 else None,
        preprocessing=datamodule.preprocessing(),
        label_smoothing=label_smoothing(cfg.loss.get("label_smoothing", 0.0)),
        fine_tuning=pretraining.fine_tuning,
    )
    from xray_cls.training.fine_tuning import check_fine_tuning

    check_fine_tuning(cfg, pretraining, module.net)
    if folder.resume_from is None:  # a resumed run's checkpoint holds its weights: nothing else is read
        load_weights(module.net, pretraining, backbone)
    log.info("network:\n%s", network_summary(module.net, (datamodule.in_channels, datamodule.image_size, datamodule.image_size)))
    return datamodule, module


def read_data(cfg: DictConfig) -> Any:
    """The run's data, seeded and read (the network is sized to it), and checked against the
    options that depend on how many classes it holds."""
    import lightning as L
    from hydra.utils import instantiate

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, seed=cfg.seed, task=cfg.task)
    datamodule.setup("fit")
    check_for_classes(cfg, len(datamodule.class_names))
    return datamodule


def continue_run(cfg: DictConfig, folder: RunFolder, net_cfg: dict[str, Any]) -> None:
    """Before a resumed run writes anything: the same network, its log, and what else changed."""
    from lightning.pytorch.utilities import rank_zero_only

    from xray_cls.training.resume import check_same_network, warn_config_changes

    check_same_network(folder.resume_from, folder.checkpoint, net_cfg)
    if folder.asked_to_resume and rank_zero_only.rank == 0:  # a requeued job logs there already
        log_to_run_folder(folder.path)
    log.info("resuming the run %s from %s", folder.path, folder.resume_from)
    warn_config_changes(folder.path, cfg)


def fit(cfg: DictConfig, folder: RunFolder, datamodule: Any, module: Any) -> Fitted:
    from xray_cls.training.callbacks import ResumableTraining
    from xray_cls.training.loggers import log_params
    from xray_cls.training.trainer import build_trainer

    trainer = build_trainer(cfg, folder.path)
    from xray_cls.training.loggers import run_hparams

    hparams = run_hparams(cfg, datamodule.image_size)
    log_params(trainer.loggers, hparams)
    if folder.resume_from is not None:
        from xray_cls.training.training_state import check_training_state

        check_training_state(folder.resume_from, folder.checkpoint, trainer, module)
        folder.checkpoint = None  # checked: Lightning reads the file itself, and the run needs the memory
    trainer.fit(module, datamodule=datamodule, ckpt_path=folder.resume_from, weights_only=True)
    resumable = next(c for c in trainer.callbacks if isinstance(c, ResumableTraining))
    last_epoch = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
    return Fitted(trainer, last_epoch, resumable.train_seconds(), resumable.seconds_before, hparams)


def make_val_choices(cfg: DictConfig, fitted: Fitted, module: Any, datamodule: Any) -> tuple[Any, tuple[Any, Any]]:
    """The tested weights (the best checkpoint's, or with checkpoint.test=last the last epoch's)
    loaded, their val choices made, and written into both checkpoints so that evaluate and predict
    apply them. Returns the choices and the val logits and labels they were made on."""
    import torch

    from xray_cls.evaluation.logits import val_predictions
    from xray_cls.metrics.val_choices import choose_on_val

    checkpoint = fitted.trainer.checkpoint_callback
    best_path = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
    last_path = Path(checkpoint.last_model_path) if checkpoint.last_model_path else None
    tested = cfg.checkpoint.test if best_path is not None else "last"
    best = None
    if tested == "best":  # loaded once: the threshold rule and the test both use it
        best = torch.load(best_path, map_location="cpu", weights_only=True)
        module.load_state_dict(best["state_dict"])
    elif cfg.checkpoint.test == "best":  # e.g. stopped by max_steps before the first validation
        log.warning("no checkpoint has a %s score: testing the weights of the last step", cfg.checkpoint.monitor)
    val = val_predictions(module, datamodule)
    choices = choose_on_val(*val, cfg.calibration, cfg.threshold_rule, cfg.threshold, cfg.target_sensitivity)
    module.apply_choices(choices)
    if fitted.trainer.is_global_zero:
        if best is not None:
            choices.record_in(best_path, best)
        if last_path is not None and last_path != best_path and last_path.is_file():
            choices.record_in(last_path, torch.load(last_path, map_location="cpu", weights_only=True))
    fitted.best_path, fitted.tested = best_path, tested
    return choices, val


def test_and_report(
    cfg: DictConfig, folder: RunFolder, fitted: Fitted, module: Any, datamodule: Any, choices: Any, val: tuple[Any, Any]
) -> dict[str, Any]:
    from xray_cls.reports.network_summary import parameter_counts
    from xray_cls.reports.test_report import test_and_report as report
    from xray_cls.runtime.slurm import slurm_job

    checkpoint = fitted.trainer.checkpoint_callback
    run = {
        "last_epoch": fitted.last_epoch,
        "best_checkpoint": {
            "path": str(fitted.best_path.relative_to(folder.path)) if fitted.best_path else None,
            "monitor": cfg.checkpoint.monitor,
            "mode": cfg.checkpoint.mode,
            "score": float(checkpoint.best_model_score) if fitted.best_path else None,
        },
        "tested_checkpoint": fitted.tested,
        "params": parameter_counts(module.net),
        "epochs": fitted.trainer.current_epoch,
        "train_seconds": round(fitted.train_seconds, 2),
        "train_seconds_before_resume": round(fitted.seconds_before, 2),
        "resumed_from": str(folder.resume_from) if folder.resume_from else None,
        "slurm": slurm_job(),
        "hparams": fitted.hparams,
    }
    metrics = report(fitted.trainer, module, datamodule, choices, cfg, folder.path, run, fitted.trainer.loggers, val=val)
    log.info("run folder: %s", folder.path)
    return metrics


def _train_in_sweep(cfg: DictConfig) -> dict[str, Any] | None:
    """One run of a multirun: a failure leaves failed.json for the report and lets the sweep go on."""
    try:
        return train(cfg)
    except RunInterrupted as err:  # Ctrl+C stops the whole sweep, not just this run
        print(f"interrupted: {error_line(err)}", file=sys.stderr)
        sys.exit(err.exit_status)
    except Exception as err:
        if run_error(err) is None:
            log.exception("run failed")
        else:
            log.error("run failed: %s", error_line(err))

        out_dir = Path(cfg.paths.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "failed.json", {"status": "failed", "error": error_line(err)})
        return None


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the best validation score (`checkpoint.monitor`): the objective of a sweeper.
    A failed run of a sweep returns NaN, which tells a sweeper such as Optuna that the trial failed."""
    metrics = _train_in_sweep(cfg) if in_multirun() else exit_on_user_error(lambda: train(cfg))
    score = metrics["best_checkpoint"]["score"] if metrics else None
    return float("nan") if score is None else score


__getattr__ = forwarding(__name__)  # the names that moved out of this module, from where they are now
