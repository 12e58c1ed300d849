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
from omegaconf import DictConfig, ListConfig, OmegaConf

from xray_cls import resolvers  # noqa: F401  the configs' resolvers, registered before Hydra composes
from xray_cls.cli import error_line, exit_on_user_error, quiet_libraries, run_error
from xray_cls.config import CONFIG_DIR, check_number, check_options, in_multirun, is_number
from xray_cls.errors import RunInterrupted, UserInputError
from xray_cls.files import write_csv, write_json, write_text

log = logging.getLogger(__name__)

SPLITS_COLUMNS = ["path", "split", "label", "patient"]  # splits.csv: which image each split holds


@dataclass
class RunFolder:
    path: Path
    resume_from: Path | None = None  # the checkpoint the run continues from
    asked_to_resume: bool = False  # ckpt_path= (else a SLURM job the scheduler restarted, or a new run)


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
    check_options(cfg, "train")  # a bad value is refused before anything is read or written
    quiet_libraries()
    folder = locate_run_folder(cfg)
    with holding(folder.path), stop_advice(folder):  # two runs, or two resumes of one run, cannot both go on in one folder
        prepare_run_folder(cfg, folder)
        datamodule, module = build_data_and_model(cfg, folder)
        fitted = fit(cfg, folder, datamodule, module)
        choices, val = make_val_choices(cfg, fitted, module, datamodule)
        return test_and_report(cfg, folder, fitted, module, datamodule, choices, val)


def locate_run_folder(cfg: DictConfig) -> RunFolder:
    """The run's folder: paths.output_dir, or the folder of the run it resumes."""
    from xray_cls.resume import requeued_checkpoint, resume_folder

    asked = bool(cfg.get("ckpt_path"))
    resume_from = Path(cfg.ckpt_path).expanduser() if asked else requeued_checkpoint(cfg)
    if resume_from is None:
        return RunFolder(Path(cfg.paths.output_dir))
    path = resume_folder(resume_from)  # the run carries on in its own folder: checkpoints, loggers, curves.csv
    cfg.paths.output_dir = str(path)
    return RunFolder(path, resume_from, asked)


@contextlib.contextmanager
def holding(path: Path) -> Any:
    """The run folder held by the first process; DDP's others write into the folder it holds."""
    from lightning.pytorch.utilities import rank_zero_only

    from xray_cls.run_folder import held

    with held(path) if rank_zero_only.rank == 0 else contextlib.nullcontext():
        yield


def stop_advice(folder: RunFolder) -> Any:
    """SIGINT or SIGTERM in any phase (reading, fitting, the val choices, the test, the report)
    ends the run in one line: resume from its last.ckpt once one exists, else run it again."""
    from lightning.pytorch.utilities import rank_zero_only

    from xray_cls.interrupts import interruptible

    def advice() -> str:
        last = folder.path / "checkpoints" / "last.ckpt"
        if last.is_file():
            return f"the run is unfinished (no metrics.json); resume with the same overrides and ckpt_path={last}"
        return "no checkpoint was written yet; run the command again"

    # DDP's other processes are stopped by Lightning's own handling, with the first one.
    return interruptible(advice) if rank_zero_only.rank == 0 else contextlib.nullcontext()


def prepare_run_folder(cfg: DictConfig, folder: RunFolder) -> None:
    """A new run's folder gets its config.yaml, once it is known to hold no other run (an explicit
    hydra.run.dir that does is refused); a resumed run's folder is kept as it is."""
    from lightning.pytorch.utilities import rank_zero_only

    from xray_cls.run_folder import refuse_results

    if folder.resume_from is not None or rank_zero_only.rank != 0:  # DDP starts the other processes with the same config
        return
    refuse_results(folder.path, ["metrics.json", "checkpoints"], "a run", "run")
    write_text(folder.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def build_data_and_model(cfg: DictConfig, folder: RunFolder) -> tuple[Any, Any]:
    """The seeded data, read so that the network can be sized to it, and the LightningModule."""
    from lightning.pytorch.utilities import rank_zero_only

    from xray_cls.classifier import XrayClassifier
    from xray_cls.pretrained import IMAGENET_GRAY, Pretraining, load_weights
    from xray_cls.run_report import network_summary

    datamodule = read_data(cfg)
    num_classes = len(datamodule.class_names)  # an .npz's labels may add classes to the task's
    if rank_zero_only.rank == 0 and not (folder.path / "splits.csv").exists():  # a resumed run keeps its own
        columns = SPLITS_COLUMNS + (["fold"] if getattr(datamodule, "folds", None) else [])  # data.folds: cross-validation
        write_csv(folder.path / "splits.csv", datamodule.split_rows(), columns)
    net_cfg = {**OmegaConf.to_container(cfg.model, resolve=True), "in_channels": datamodule.in_channels,
               "image_size": datamodule.image_size}
    pretraining = Pretraining.pop_from(net_cfg)  # model.weights, ...: how to start, not what to build
    if pretraining.weights is not None:  # pretrained filters expect the pixels scaled as in their training
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
    check_fine_tuning(cfg, pretraining, module.net)
    if folder.resume_from is None:  # a resumed run's checkpoint holds its weights: nothing else is read
        load_weights(module.net, pretraining)
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

    from xray_cls.resume import check_same_network, warn_config_changes

    check_same_network(folder.resume_from, net_cfg)
    if folder.asked_to_resume and rank_zero_only.rank == 0:  # a requeued job logs there already
        log_to_run_folder(folder.path)
    log.info("resuming the run %s from %s", folder.path, folder.resume_from)
    warn_config_changes(folder.path, cfg)


def fit(cfg: DictConfig, folder: RunFolder, datamodule: Any, module: Any) -> Fitted:
    from xray_cls.callbacks import ResumableTraining
    from xray_cls.loggers import log_params

    trainer = build_trainer(cfg, folder.path)
    hparams = run_hparams(cfg, datamodule.image_size)
    log_params(trainer.loggers, hparams)
    if folder.resume_from is not None:
        from xray_cls.resume import check_training_state

        check_training_state(folder.resume_from, trainer, module)
    trainer.fit(module, datamodule=datamodule, ckpt_path=folder.resume_from, weights_only=True)
    resumable = next(c for c in trainer.callbacks if isinstance(c, ResumableTraining))
    last_epoch = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
    return Fitted(trainer, last_epoch, resumable.train_seconds(), resumable.seconds_before, hparams)


def make_val_choices(cfg: DictConfig, fitted: Fitted, module: Any, datamodule: Any) -> tuple[Any, tuple[Any, Any]]:
    """The tested weights (the best checkpoint's, or with checkpoint.test=last the last epoch's)
    loaded, their val choices made, and written into both checkpoints so that evaluate and predict
    apply them. Returns the choices and the val logits and labels they were made on."""
    import torch

    from xray_cls.val_choices import choose_on_val, val_predictions

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
    from xray_cls import run_report
    from xray_cls.slurm import slurm_job

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
        "params": run_report.parameter_counts(module.net),
        "epochs": fitted.trainer.current_epoch,
        "train_seconds": round(fitted.train_seconds, 2),
        "train_seconds_before_resume": round(fitted.seconds_before, 2),
        "resumed_from": str(folder.resume_from) if folder.resume_from else None,
        "slurm": slurm_job(),
        "hparams": fitted.hparams,
    }
    metrics = run_report.test_and_report(fitted.trainer, module, datamodule, choices, cfg, folder.path, run, fitted.trainer.loggers,
                                         val=val)
    log.info("run folder: %s", folder.path)
    return metrics


def log_to_run_folder(run_dir: Path) -> None:
    """A resumed run's log continues in its own train.log, beside the resuming command's."""
    handler = logging.FileHandler(run_dir / "train.log", errors="backslashreplace")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
    logging.getLogger().addHandler(handler)


def positive_class_weight(setting: float | str | None, class_counts: list[int]) -> float | None:
    """loss.pos_weight: null (no weighting), a number, or `balanced` (NORMAL / PNEUMONIA counts of train)."""
    if setting is None:
        return None
    if setting == "balanced":
        negatives, positives = class_counts
        return negatives / positives
    return float(check_number("loss.pos_weight", setting, 0, low_open=True, expected="null, balanced or a positive number"))


def check_for_classes(cfg: DictConfig, num_classes: int) -> None:
    """The options that apply to two classes only, or to three or more only, each refused in one
    line where they do not, before anything is trained."""
    from xray_cls.val_choices import check_rule_applies

    check_rule_applies(cfg.threshold_rule, num_classes)
    class_weight = cfg.loss.get("class_weight")
    if num_classes == 2 and class_weight is not None:
        raise UserInputError(f"loss.class_weight={class_weight} weighs three or more classes; this task has two: "
                             "expected loss.pos_weight (null, balanced or a number) and loss.class_weight=null")
    if num_classes > 2 and cfg.loss.pos_weight is not None:
        raise UserInputError(f"loss.pos_weight={cfg.loss.pos_weight} weighs the positive class of two; this task has "
                             f"{num_classes} classes: expected loss.class_weight (null, balanced or a list of {num_classes} numbers) "
                             "and loss.pos_weight=null")
    if num_classes > 2 and class_weight is not None and class_weight != "balanced":
        class_weights(class_weight, [1] * num_classes)


def check_fine_tuning(cfg: DictConfig, pretraining: Any, net: Any) -> None:
    """model.freeze_epochs and backbone_lr_scale need a backbone; freezing under DDP needs DDP to
    expect parameters without gradients."""
    if pretraining.fine_tuning is None:
        return
    if not hasattr(net, "backbone_parameters"):
        raise UserInputError(f"model.freeze_epochs and model.backbone_lr_scale fine-tune a pretrained backbone; the "
                             f"{type(net).__name__} has none: expected model=torchvision, model=timm or one of their configs")
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if pretraining.freeze_epochs and strategy.startswith("ddp") and "find_unused_parameters_true" not in strategy:
        raise UserInputError(f"model.freeze_epochs={pretraining.freeze_epochs} with trainer.strategy={strategy}: DDP waits for the "
                             "frozen parameters' gradients; expected trainer.strategy=ddp_find_unused_parameters_true")


def class_weights(setting: Any, class_counts: list[int]) -> list[float] | None:
    """loss.class_weight for K >= 3 classes: null (none), `balanced` (n / (K * count) of train, so
    that every class weighs as much in the loss) or a list of K positive numbers, in label order."""
    k = len(class_counts)
    if setting is None:
        return None
    if setting == "balanced":
        total = sum(class_counts)
        if min(class_counts) == 0:
            raise UserInputError(f"loss.class_weight=balanced: the train split has no image of class {class_counts.index(0)}")
        return [total / (k * n) for n in class_counts]
    values = list(setting) if isinstance(setting, (list, tuple, ListConfig)) else None
    if values is None or len(values) != k or not all(is_number(v) and v > 0 for v in values):
        raise UserInputError(f"loss.class_weight={setting} is not valid; expected null, balanced or a list of {k} positive numbers")
    return [float(v) for v in values]


def label_smoothing(setting: float) -> float:
    """loss.label_smoothing: a number in [0, 1) (0: hard 0/1 targets)."""
    return float(check_number("loss.label_smoothing", setting, 0, 1, high_open=True))


def build_trainer(cfg: DictConfig, out_dir: Path) -> Any:
    """The configured Trainer with the `logger` and `callbacks` configs; checkpoints go to
    out_dir/checkpoints (callbacks.model_checkpoint), which resuming and testing rely on."""
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from xray_cls.checkpoint import DurableCheckpointIO
    from xray_cls.loggers import build_loggers
    from xray_cls.run_report import CURVES_LAYOUT

    callbacks = run_callbacks(cfg, out_dir)
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


def run_callbacks(cfg: DictConfig, out_dir: Path) -> list[Any]:
    """The `callbacks` configs, with the ones every run needs: exactly one ModelCheckpoint writing to
    out_dir/checkpoints, ResumableTraining, ReturnFreedMemory and (unless hidden) the progress bar."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar

    from xray_cls.callbacks import ProgressBar, ResumableTraining, ReturnFreedMemory

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    expected = out_dir / "checkpoints"
    if len(checkpoints) != 1 or Path(checkpoints[0].dirpath).resolve() != expected.resolve():
        raise UserInputError(
            f"callbacks: a run needs exactly one ModelCheckpoint writing to {expected} (callbacks.model_checkpoint, "
            "part of callbacks=default); add callbacks with callbacks=[default,early_stopping]"
        )
    callbacks += [ResumableTraining(last_checkpoint=expected / "last.ckpt"), ReturnFreedMemory()]
    freeze_epochs = cfg.model.get("freeze_epochs", 0)
    if freeze_epochs:
        from xray_cls.pretrained import FreezeBackbone

        callbacks.append(FreezeBackbone(freeze_epochs))
    # callbacks.progress_bar (part of callbacks=default); Lightning refuses a bar it was told not to show.
    bars = [c for c in callbacks if isinstance(c, LightningProgressBar)]
    if not cfg.trainer.get("enable_progress_bar", True):
        return [c for c in callbacks if not isinstance(c, LightningProgressBar)]
    return callbacks if bars else [*callbacks, ProgressBar()]  # a callbacks list without it: the same bar


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
        "model": cfg.model.get("name") or network_name(cfg.model).lower(),  # torchvision's and timm's by their name
        "dropout": cfg.model.get("dropout", 0.0),
        "aug": cfg.data.aug,
        "aspect": cfg.data.get("aspect", 0.0),
        "mixup": cfg.data.get("mixup", 0.0),
        "label_smoothing": cfg.loss.get("label_smoothing", 0.0),
        "lr": cfg.optimizer.lr,
        "pos_weight": "none" if cfg.loss.pos_weight is None else cfg.loss.pos_weight,
        **({"class_weight": str(cfg.loss.class_weight)} if cfg.loss.get("class_weight") is not None else {}),
        "threshold_rule": cfg.threshold_rule,
        "calibration": cfg.get("calibration", "none"),
        "checkpoint": f"{cfg.checkpoint.monitor} ({cfg.checkpoint.mode})",  # what runs are chosen by
        "batch_size": cfg.data.batch_size,
        "seed": cfg.seed,
        "image_size": image_size,
        "max_epochs": cfg.trainer.max_epochs,
    }


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
