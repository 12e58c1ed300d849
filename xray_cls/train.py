"""`python -m xray_cls`: compose the config, train, test the best checkpoint, write the run's report.

Everything a run writes goes under its Hydra output folder (`outputs/<date>/<time>/` by default):
config.yaml, checkpoints/, tensorboard/, figures/, metrics.json and the log.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from xray_cls.errors import RunError

log = logging.getLogger(__name__)

# conf/ sits beside the package in a source checkout and inside it in an installed wheel.
_PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = next(p for p in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf") if p.is_dir())


def train(cfg: DictConfig) -> dict[str, Any]:
    """One run: fit, test the best checkpoint, write metrics.json. Returns the metrics."""
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.utilities import rank_zero_only

    from xray_cls import run_report
    from xray_cls.classifier import XrayClassifier
    from xray_cls.data import CLASS_NAMES

    quiet_libraries()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # DDP starts the other processes with the same config
        OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, seed=cfg.seed)
    datamodule.setup("fit")  # reads the data, so the network can be sized to it
    net_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    net_cfg.update(in_channels=datamodule.in_channels, image_size=datamodule.image_size)
    module = XrayClassifier(
        net=net_cfg,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        threshold=cfg.threshold,
        pos_weight=positive_class_weight(cfg.loss.pos_weight, datamodule.splits["train"].class_counts()),
    )
    input_shape = (datamodule.in_channels, datamodule.image_size, datamodule.image_size)
    log.info("network:\n%s", run_report.network_summary(module.net, input_shape))

    trainer = build_trainer(cfg, out_dir)
    checkpoint, logger = trainer.checkpoint_callback, trainer.logger

    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_seconds = time.perf_counter() - started
    last_epoch = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}

    if checkpoint.best_model_path:  # loaded once: the threshold rule and the test both use it
        best = torch.load(checkpoint.best_model_path, map_location=module.device, weights_only=True)
        module.load_state_dict(best["state_dict"])
    else:  # e.g. stopped by max_steps before the first validation
        log.warning("no checkpoint has a %s score: testing the weights of the last step", cfg.checkpoint.monitor)
    threshold = decide_threshold(cfg, module, datamodule)
    module.set_threshold(threshold["threshold"])
    trainer.test(module, datamodule=datamodule, verbose=False)
    results = module.test_results
    metrics = {
        "class_names": list(CLASS_NAMES),
        "positive_class": CLASS_NAMES[1],
        "threshold": threshold["threshold"],
        "threshold_rule": threshold,
        "n_test": sum(map(sum, results["confusion_matrix"])),
        "confusion_matrix": {
            "rows": "true class",
            "columns": "predicted class",
            "matrix": results["confusion_matrix"],
            **run_report.confusion_cells(results["confusion_matrix"]),
        },
        "test": results["scores"],
        "test_ci": {
            "confidence": cfg.bootstrap.confidence,
            "resamples": cfg.bootstrap.resamples,
            **run_report.bootstrap_intervals(
                results["probs"], results["labels"], threshold["threshold"], cfg.bootstrap.resamples, cfg.bootstrap.confidence, cfg.seed
            ),
        },
        "last_epoch": last_epoch,
        "best_checkpoint": {
            "path": str(Path(checkpoint.best_model_path).relative_to(out_dir)) if checkpoint.best_model_path else None,
            "monitor": cfg.checkpoint.monitor,
            "score": float(checkpoint.best_model_score) if checkpoint.best_model_path else None,
        },
        "params": run_report.parameter_counts(module.net),
        "epochs": trainer.current_epoch,
        "train_seconds": round(train_seconds, 2),
        "hparams": run_hparams(cfg, datamodule.image_size),
    }
    if trainer.is_global_zero:
        write_run_report(metrics, results, logger, out_dir, trainer.global_step)
    return metrics


def decide_threshold(cfg: DictConfig, module: Any, datamodule: Any) -> dict[str, Any]:
    """The test threshold by `threshold_rule`, from the module's predictions on val only."""
    from xray_cls.run_report import choose_threshold

    val = datamodule.splits["val"]
    probs = module.predict_probabilities(datamodule.preprocess(val.images.to(module.device)))
    chosen = choose_threshold(cfg.threshold_rule, probs.cpu(), val.labels.cpu(), cfg.threshold, cfg.target_sensitivity)
    log.info(
        "threshold %.4f (%s rule on val): val sensitivity %.4f, specificity %.4f",
        chosen["threshold"], chosen["rule"], chosen["val_sensitivity"], chosen["val_specificity"],
    )
    return chosen


def positive_class_weight(setting: float | str | None, class_counts: list[int]) -> float | None:
    """loss.pos_weight: null (no weighting), a number, or `balanced` (NORMAL / PNEUMONIA counts of train)."""
    from xray_cls.errors import UserInputError

    if setting is None:
        return None
    if setting == "balanced":
        negatives, positives = class_counts
        return negatives / positives
    if isinstance(setting, (int, float)) and not isinstance(setting, bool) and setting > 0:
        return float(setting)
    raise UserInputError(f"loss.pos_weight={setting!r} is not valid; expected null, balanced or a positive number")


def quiet_libraries() -> None:
    # Lightning adds its own console handler; Hydra's handlers (console and the run's log file) suffice.
    logging.getLogger("lightning").handlers.clear()
    # The data lives in memory: loader worker processes would only add start-up time.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")  # Lightning 2.6 on torch 2.14
    # Logged values come from torchmetrics' compute(), which already reduced them across processes.
    warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")


def build_trainer(cfg: DictConfig, out_dir: Path) -> Any:
    """The configured Trainer, logging to out_dir/tensorboard and checkpointing to out_dir/checkpoints."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from xray_cls.run_report import CURVES_LAYOUT

    logger = TensorBoardLogger(save_dir=out_dir, name="", version="tensorboard", default_hp_metric=False)
    checkpoint = ModelCheckpoint(
        dirpath=out_dir / "checkpoints",
        filename="best",
        monitor=cfg.checkpoint.monitor,
        mode=cfg.checkpoint.mode,
        save_last=True,
    )
    callbacks = [checkpoint, LearningRateMonitor(logging_interval="epoch")]
    callbacks += [instantiate(c) for c in cfg.callbacks.values()]
    trainer = instantiate(
        cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=out_dir, precision=supported_precision(cfg.trainer)
    )
    if trainer.is_global_zero:
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
    return {
        "model": cfg.model._target_.rsplit(".", 1)[-1].lower(),
        "dropout": cfg.model.get("dropout", 0.0),
        "aug": cfg.data.aug,
        "lr": cfg.optimizer.lr,
        "pos_weight": "none" if cfg.loss.pos_weight is None else cfg.loss.pos_weight,
        "threshold_rule": cfg.threshold_rule,
        "batch_size": cfg.data.batch_size,
        "seed": cfg.seed,
        "image_size": image_size,
        "max_epochs": cfg.trainer.max_epochs,
    }


def write_run_report(metrics: dict[str, Any], results: dict[str, Any], logger: Any, out_dir: Path, step: int) -> None:
    from xray_cls import run_report

    run_report.save_figures(run_report.make_test_figures(results, metrics["class_names"]), out_dir / "figures", logger.experiment, step)
    hp_metrics = {f"hparams/test_{k}": v for k, v in metrics["test"].items()}
    hp_metrics.update({f"hparams/{k.replace('/', '_')}": v for k, v in metrics["last_epoch"].items() if k.endswith("/val")})
    logger.log_hyperparams(metrics["hparams"], metrics=hp_metrics)
    logger.finalize("success")
    run_report.write_json(out_dir / "metrics.json", metrics)
    print(run_report.format_test_table(metrics), flush=True)
    log.info("run folder: %s", out_dir)


def _run_error(err: BaseException | None) -> RunError | None:
    """The RunError behind `err`, also when Hydra's instantiate wrapped it."""
    while err is not None:
        if isinstance(err, RunError):
            return err
        err = err.__cause__
    return None


def error_line(err: BaseException) -> str:
    """One line that says what went wrong: the user's mistake as is, a bug with its exception type."""
    run_error = _run_error(err)
    text = str(run_error) if run_error else f"{type(err).__name__}: {err}"
    return " ".join(text.split())


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the best validation score (`checkpoint.monitor`): the objective of a sweeper."""
    try:
        metrics = train(cfg)
    except Exception as err:
        if _in_multirun():
            # One failed run must not stop a sweep: it leaves failed.json for the report, and
            # NaN tells a sweeper such as Optuna that the trial failed.
            if _run_error(err) is None:
                log.exception("run failed")
            else:
                log.error("run failed: %s", error_line(err))
            from xray_cls.run_report import write_json

            out_dir = Path(cfg.paths.output_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json(out_dir / "failed.json", {"status": "failed", "error": error_line(err)})
            return float("nan")
        if _run_error(err) is None:
            raise  # a bug: keep its traceback
        print(f"error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)
    score = metrics["best_checkpoint"]["score"]
    return float("nan") if score is None else score
