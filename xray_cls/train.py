"""`python -m xray_cls`: compose the config, train, test the best checkpoint, write the run's report.

Everything a run writes goes under its Hydra output folder (`outputs/<date>/<time>/` by default):
config.yaml, checkpoints/, curves.csv, figures/, metrics.json, the log, and each logger's
files (tensorboard/ by default; csv/, wandb/ with logger=csv or wandb).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from xray_cls.cli import (
    CONFIG_DIR, error_line, exit_on_user_error, freed_memory_returner, progress_bar, quiet_libraries, return_freed_memory, run_error,
)
from xray_cls.errors import RunInterrupted, UserInputError, is_number
from xray_cls.files import write_csv, write_json

log = logging.getLogger(__name__)

SPLITS_COLUMNS = ["path", "split", "label", "patient"]  # splits.csv: which image each split holds


def train(cfg: DictConfig) -> dict[str, Any]:
    """One run: fit, test the best checkpoint, write metrics.json. Returns the metrics.

    With `ckpt_path` set, an interrupted run continues in its own folder from that checkpoint; so
    does the run of a SLURM job that the scheduler restarted (see resume.requeued_checkpoint).
    """
    from lightning.pytorch.utilities import rank_zero_only

    from xray_cls.resume import requeued_checkpoint, resume_folder
    from xray_cls.run_folder import held

    quiet_libraries()
    calibration_method(cfg)  # a typo is refused before training, not after it
    if cfg.checkpoint.get("test", "best") not in ("best", "last"):
        raise UserInputError(f"checkpoint.test={cfg.checkpoint.test!r} is not valid; expected best or last")
    asked_to_resume = bool(cfg.get("ckpt_path"))
    resume_from = Path(cfg.ckpt_path).expanduser() if asked_to_resume else requeued_checkpoint(cfg)
    if resume_from is not None:  # the run carries on in its own folder: checkpoints, loggers, curves.csv
        out_dir = resume_folder(resume_from)
        cfg.paths.output_dir = str(out_dir)
    else:
        out_dir = Path(cfg.paths.output_dir)
    if rank_zero_only.rank != 0:  # DDP's other processes write into the folder the first one holds
        return run_in_folder(cfg, out_dir, resume_from, asked_to_resume)
    with held(out_dir):  # two runs, or two resumes of one run, cannot both go on in one folder
        return run_in_folder(cfg, out_dir, resume_from, asked_to_resume)


def run_in_folder(cfg: DictConfig, out_dir: Path, resume_from: Path | None, asked_to_resume: bool) -> dict[str, Any]:
    """The run in its folder, which this process holds: new, or resumed from `resume_from`."""
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.utilities import rank_zero_only

    from xray_cls import run_report
    from xray_cls.checkpoint import record_val_choices
    from xray_cls.classifier import XrayClassifier
    from xray_cls.loggers import log_params
    from xray_cls.resume import ResumableTraining, check_same_network, warn_config_changes
    from xray_cls.slurm import slurm_job

    if resume_from is None:
        new_run_folder(cfg)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, seed=cfg.seed)
    datamodule.setup("fit")  # reads the data, so the network can be sized to it
    if rank_zero_only.rank == 0 and not (out_dir / "splits.csv").exists():  # a resumed run keeps its own
        write_csv(out_dir / "splits.csv", datamodule.split_rows(), SPLITS_COLUMNS)
    net_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    net_cfg.update(in_channels=datamodule.in_channels, image_size=datamodule.image_size)
    if resume_from is not None:  # checked before anything is written to the run's folder
        check_same_network(resume_from, net_cfg)
        if asked_to_resume and rank_zero_only.rank == 0:  # a requeued job logs there already
            log_to_run_folder(out_dir)
        log.info("resuming the run %s from %s", out_dir, resume_from)
        warn_config_changes(out_dir, cfg)
    module = XrayClassifier(
        net=net_cfg,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        threshold=cfg.threshold,
        pos_weight=positive_class_weight(cfg.loss.pos_weight, datamodule.splits["train"].class_counts()),
        preprocessing=datamodule.preprocessing(),
        label_smoothing=label_smoothing(cfg.loss.get("label_smoothing", 0.0)),
    )
    input_shape = (datamodule.in_channels, datamodule.image_size, datamodule.image_size)
    log.info("network:\n%s", run_report.network_summary(module.net, input_shape))

    trainer = build_trainer(cfg, out_dir)
    checkpoint = trainer.checkpoint_callback
    resumable = next(c for c in trainer.callbacks if isinstance(c, ResumableTraining))
    hparams = run_hparams(cfg, datamodule.image_size)
    log_params(trainer.loggers, hparams)

    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    train_seconds = resumable.train_seconds()  # also the time before an interruption
    last_epoch = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}

    best_path = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
    last_path = Path(checkpoint.last_model_path) if checkpoint.last_model_path else None
    tested = cfg.checkpoint.get("test", "best")
    best = None
    if tested == "best" and best_path is not None:  # loaded once: the threshold rule and the test both use it
        best = torch.load(best_path, map_location="cpu", weights_only=True)
        module.load_state_dict(best["state_dict"])
    elif tested == "best":  # e.g. stopped by max_steps before the first validation
        log.warning("no checkpoint has a %s score: testing the weights of the last step", cfg.checkpoint.monitor)
    val = val_predictions(module, datamodule)  # calibration, then the threshold on calibrated val probabilities
    module.set_temperature(fit_calibration(cfg, *val))
    threshold = decide_threshold(cfg, torch.sigmoid(val[0] / module.temperature), val[1])
    module.set_threshold(threshold["threshold"])
    if trainer.is_global_zero:  # so that predict and evaluate apply the run's choices
        if best is not None:
            record_val_choices(best_path, best, threshold, module.temperature)
        # last.ckpt too: its weights were tested (checkpoint.test=last), or it continues the tested run
        if last_path is not None and last_path != best_path and last_path.is_file():
            record_val_choices(last_path, torch.load(last_path, map_location="cpu", weights_only=True), threshold, module.temperature)
    best = None  # its optimizer state (twice the weights, for Adam) need not stay through the test
    run = {
        "last_epoch": last_epoch,
        "best_checkpoint": {
            "path": str(best_path.relative_to(out_dir)) if best_path else None,
            "monitor": cfg.checkpoint.monitor,
            "mode": cfg.checkpoint.mode,
            "score": float(checkpoint.best_model_score) if best_path else None,
        },
        "tested_checkpoint": tested if tested == "last" or best_path is not None else "last",  # whose weights the test saw
        "params": run_report.parameter_counts(module.net),
        "epochs": trainer.current_epoch,
        "train_seconds": round(train_seconds, 2),
        "resumed_from": str(resume_from) if resume_from else None,
        "slurm": slurm_job(),
        "hparams": hparams,
    }
    metrics = run_report.test_and_report(trainer, module, datamodule, threshold, cfg, out_dir, run, trainer.loggers, val=val)
    log.info("run folder: %s", out_dir)
    return metrics


def new_run_folder(cfg: DictConfig) -> Path:
    """paths.output_dir with the run's config.yaml in it. A folder that already holds a run (an
    explicit hydra.run.dir) is refused: a new run never writes over another."""
    from lightning.pytorch.utilities import rank_zero_only

    from xray_cls.run_folder import refuse_results

    out_dir = Path(cfg.paths.output_dir)
    if rank_zero_only.rank != 0:  # DDP starts the other processes with the same config
        return out_dir
    refuse_results(out_dir, ["metrics.json", "checkpoints"], "a run", "run")
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    return out_dir


def log_to_run_folder(run_dir: Path) -> None:
    """A resumed run's log continues in its own train.log, beside the resuming command's."""
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
    logging.getLogger().addHandler(handler)


CALIBRATIONS = ("none", "temperature")


def val_predictions(module: Any, datamodule: Any) -> tuple[Any, Any]:
    """The module's logits (before any temperature) and the labels of the val split, batch by
    batch: a large val split is never copied whole, let alone as float."""
    import torch

    val = datamodule.splits["val"]
    logits = []
    for images in val.batches(datamodule.batch_size):
        logits.append(module.predict_logits(datamodule.preprocess(images.to(module.device))).cpu())
        return_freed_memory()  # else each batch's freed activations pile up in the threads' arenas
    return torch.cat(logits), val.labels.cpu()


def fit_calibration(cfg: DictConfig, val_logits: Any, val_labels: Any) -> float:
    """The temperature by `calibration`: 1 (none), or temperature scaling fitted on val only."""
    from xray_cls.metrics import TEMPERATURE_RANGE, calibration_error, fit_temperature

    if calibration_method(cfg) == "none":
        return 1.0
    temperature = fit_temperature(val_logits, val_labels)
    if temperature in TEMPERATURE_RANGE:
        log.warning("the temperature fitted on val reached the limit %s: val may be too small or too easy", temperature)
    before = calibration_error(val_logits.sigmoid(), val_labels)
    after = calibration_error((val_logits / temperature).sigmoid(), val_labels)
    log.info("temperature %.4f fitted on val: val ECE %.4f before, %.4f after", temperature, before, after)
    return temperature


def calibration_method(cfg: DictConfig) -> str:
    method = cfg.get("calibration", "none")
    if method not in CALIBRATIONS:
        raise UserInputError(f"calibration={method!r} is not known; expected one of {', '.join(CALIBRATIONS)}")
    return method


def decide_threshold(cfg: DictConfig, val_probs: Any, val_labels: Any) -> dict[str, Any]:
    """The test threshold by `threshold_rule`, from the module's (calibrated) probabilities on val only."""
    from xray_cls.metrics import choose_threshold

    chosen = choose_threshold(cfg.threshold_rule, val_probs, val_labels, cfg.threshold, cfg.target_sensitivity)
    log.info(
        "threshold %.4f (%s rule on val): val sensitivity %.4f, specificity %.4f",
        chosen["threshold"], chosen["rule"], chosen["val_sensitivity"], chosen["val_specificity"],
    )
    return chosen


def positive_class_weight(setting: float | str | None, class_counts: list[int]) -> float | None:
    """loss.pos_weight: null (no weighting), a number, or `balanced` (NORMAL / PNEUMONIA counts of train)."""
    if setting is None:
        return None
    if setting == "balanced":
        negatives, positives = class_counts
        return negatives / positives
    if is_number(setting) and setting > 0:
        return float(setting)
    raise UserInputError(f"loss.pos_weight={setting!r} is not valid; expected null, balanced or a positive number")


def label_smoothing(setting: float) -> float:
    """loss.label_smoothing: a number in [0, 1) (0: hard 0/1 targets)."""
    if is_number(setting) and 0 <= setting < 1:
        return float(setting)
    raise UserInputError(f"loss.label_smoothing={setting!r} is not valid; expected a number in [0, 1)")


def build_trainer(cfg: DictConfig, out_dir: Path) -> Any:
    """The configured Trainer with the `logger` and `callbacks` configs; checkpoints go to
    out_dir/checkpoints (callbacks.model_checkpoint), which resuming and testing rely on."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from xray_cls.checkpoint import DurableCheckpointIO
    from xray_cls.loggers import build_loggers
    from xray_cls.resume import ResumableTraining
    from xray_cls.run_report import CURVES_LAYOUT

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    expected = out_dir / "checkpoints"
    if len(checkpoints) != 1 or Path(checkpoints[0].dirpath).resolve() != expected.resolve():
        raise UserInputError(
            f"callbacks: a run needs exactly one ModelCheckpoint writing to {expected} (callbacks.model_checkpoint, "
            "part of callbacks=default); add callbacks with callbacks=[default,early_stopping]"
        )
    callbacks.append(ResumableTraining(last_checkpoint=expected / "last.ckpt"))
    callbacks.append(freed_memory_returner())
    # callbacks.progress_bar (part of callbacks=default); Lightning refuses a bar it was told not to show.
    bars = [c for c in callbacks if isinstance(c, ProgressBar)]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    elif not bars:  # a callbacks list without it: the same bar, at its default refresh
        callbacks.append(progress_bar())
    # In a SLURM job, a restarted job resumes its run from last.ckpt (resume.requeued_checkpoint);
    # Lightning's own SIGUSR1 auto-requeue, with its separate hpc_ckpt files, stays off.
    plugins: list[Any] = [DurableCheckpointIO()]  # checkpoints written beside their final name, never via $TMPDIR
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    loggers = build_loggers(cfg.get("logger"), out_dir)
    trainer = instantiate(
        cfg.trainer, logger=loggers, callbacks=callbacks, default_root_dir=out_dir,
        precision=supported_precision(cfg.trainer), plugins=plugins,
    )
    if trainer.is_global_zero:
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(CURVES_LAYOUT)
    return trainer


def supported_precision(trainer_cfg: DictConfig) -> str:
    """The precision to train in: `auto` is bf16-mixed on a GPU (16-mixed on GPUs without bf16)
    and 32-true elsewhere; an explicit bf16 setting also falls back to 16-mixed on such GPUs."""
    import torch

    precision = str(trainer_cfg.precision)
    on_gpu = trainer_cfg.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16-mixed" if on_gpu else "32-true"
    if precision.startswith("bf16") and on_gpu and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bf16: using 16-mixed precision instead of %s", precision)
        return "16-mixed"
    return precision


def run_hparams(cfg: DictConfig, image_size: int) -> dict[str, Any]:
    """The settings a study compares runs by (TensorBoard's HParams columns)."""
    from xray_cls.checkpoint import network_name

    return {
        "model": network_name(cfg.model).lower(),
        "dropout": cfg.model.get("dropout", 0.0),
        "aug": cfg.data.aug,
        "aspect": cfg.data.get("aspect", 0.0),
        "mixup": cfg.data.get("mixup", 0.0),
        "label_smoothing": cfg.loss.get("label_smoothing", 0.0),
        "lr": cfg.optimizer.lr,
        "pos_weight": "none" if cfg.loss.pos_weight is None else cfg.loss.pos_weight,
        "threshold_rule": cfg.threshold_rule,
        "calibration": cfg.get("calibration", "none"),
        "checkpoint": f"{cfg.checkpoint.monitor} ({cfg.checkpoint.mode})",  # what runs are chosen by
        "batch_size": cfg.data.batch_size,
        "seed": cfg.seed,
        "image_size": image_size,
        "max_epochs": cfg.trainer.max_epochs,
    }


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _train_in_sweep(cfg: DictConfig) -> dict[str, Any] | None:
    """One run of a multirun: a failure leaves failed.json for the report and lets the sweep go on."""
    try:
        return train(cfg)
    except RunInterrupted as err:  # Ctrl+C stops the whole sweep, not just this run
        print(f"interrupted: {error_line(err)}", file=sys.stderr)
        sys.exit(130)
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
    metrics = _train_in_sweep(cfg) if _in_multirun() else exit_on_user_error(lambda: train(cfg))
    score = metrics["best_checkpoint"]["score"] if metrics else None
    return float("nan") if score is None else score
