"""The run's experiment loggers (`logger=` configs) and what each of them receives beyond Lightning's
own logging: the run's hparams with its results, and the test figures.

Lightning sends every logger the per-epoch curves and the test metrics. Figures and the HParams
differ by logger; `log_figures` and `log_results` are the one place that knows how. Whatever the
loggers, every run also writes `curves.csv` (`EpochCurves`): the sweep report reads that file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from xray_cls.core.errors import UserInputError
from xray_cls.core.files import atomic_write, write_csv, write_json
from xray_cls.core.untrusted import CURVES_FILE, read_epoch_curves

if TYPE_CHECKING:
    from matplotlib.figure import Figure


RUN_IDS_FILE = "logger_runs.json"


class EpochCurves(Logger):
    """`curves.csv` in the run folder: one row per epoch (from 1), one column per train/val metric
    (loss/train, acc/train, loss/val, acc/val, auroc/val). A resumed run rewrites the epochs it trains again and keeps the earlier ones."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.path = Path(run_dir) / CURVES_FILE
        self.rows: dict[int, dict[str, float]] = read_epoch_curves(self.path) if self.path.is_file() else {}

    @property
    def name(self) -> str:
        return "curves"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the run's config.yaml and metrics.json hold them

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "epoch" not in metrics:
            return
        values = {k: float(v) for k, v in metrics.items() if k != "epoch" and "test" not in k}
        if values:
            self.rows.setdefault(int(metrics["epoch"]) + 1, {}).update(values)
            self.save()

    @rank_zero_only
    def save(self) -> None:
        columns = sorted({k for row in self.rows.values() for k in row})
        write_csv(self.path, ({"epoch": epoch, **row} for epoch, row in sorted(self.rows.items())), ["epoch", *columns])






def build_loggers(logger_cfg: DictConfig | None, run_dir: Path) -> list[Logger]:
    """The configured loggers (each `_target_` entry of `logger`), then EpochCurves. A resumed run
    continues its own MLflow run: the ids are kept in the run folder's logger_runs.json."""
    from hydra.utils import instantiate

    known = json.loads((run_dir / RUN_IDS_FILE).read_text()) if (run_dir / RUN_IDS_FILE).is_file() else {}
    loggers = {}
    for name, entry in (logger_cfg or {}).items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            resume = {"run_id": known[name]} if name in known else {}
            try:
                loggers[name] = instantiate(entry, **resume)
            except ImportError as err:  # an optional package: say which, and how to get it
                raise UserInputError(
                    f"logger={name} needs a package that is not installed ({err}); pip install 'xray_cls[loggers]'"
                ) from None
    remember_runs(loggers, run_dir)
    return [*loggers.values(), EpochCurves(run_dir)]


@rank_zero_only
def remember_runs(loggers: dict[str, Logger], run_dir: Path) -> None:
    ids = {name: logger.run_id for name, logger in loggers.items() if isinstance(logger, MLFlowLogger)}
    if ids:
        write_json(run_dir / RUN_IDS_FILE, ids)


def log_figures(loggers: list[Logger], figures: dict[str, Figure], step: int) -> None:
    """Each figure as `test/<name>` in every logger: a TensorBoard image, an MLflow artifact
    (figures/<name>.png), a W&B image, a PNG beside the CSV logger's metrics.csv."""
    for logger in loggers:
        for name, fig in figures.items():
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(f"test/{name}", fig, global_step=step, close=False)
            elif isinstance(logger, MLFlowLogger):
                logger.experiment.log_figure(logger.run_id, fig, f"figures/{name}.png")
            elif isinstance(logger, WandbLogger):
                logger.log_image(f"test/{name}", [figure_pixels(fig)], step=step)
            elif isinstance(logger, CSVLogger):
                with atomic_write(Path(logger.log_dir) / f"{name}.png") as tmp:
                    fig.savefig(tmp, format="png", dpi=120)
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.flush()


def figure_pixels(fig: Figure) -> Any:
    """The figure as an RGB array, as W&B takes images."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return np.asarray(Image.open(buffer).convert("RGB"))


def log_params(loggers: list[Logger], hparams: dict[str, Any]) -> None:
    """The settings a study compares runs by, at the start of the run (MLflow params, W&B config,
    the CSV logger's hparams.yaml). TensorBoard gets them at the end, with the results."""
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hparams)


def per_class_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Three or more classes: each class's test scores, as `test_per_class/<class>/<score>`, the class
    name in the characters every tracker takes."""
    import re

    def tag(name: str) -> str:
        return re.sub(r"[^\w.-]+", "_", name)

    return {
        f"test_per_class/{tag(name)}/{score}": value
        for name, scores in (metrics.get("per_class") or {}).items()
        for score, value in scores.items() if score != "support" and value is not None
    }


def log_results(loggers: list[Logger], metrics: dict[str, Any]) -> None:
    """At the end of the run: TensorBoard's HParams entry, then every logger is closed. The other
    loggers already have the test metrics.

    The HParams table's first metric column is the one to choose runs by: the score of the
    checkpoint each run chose on val (`hparams/best_<monitor>`, e.g. hparams/best_auroc_val; the
    `checkpoint` hparam says which monitor and mode). The last epoch's val metrics and the test
    metrics follow, to be read, not to choose by."""
    best = metrics.get("best_checkpoint") or {}
    hp_metrics = {f"hparams/best_{best['monitor'].replace('/', '_')}": best["score"]} if best.get("score") is not None else {}
    hp_metrics.update({f"hparams/{k.replace('/', '_')}": v for k, v in metrics.get("last_epoch", {}).items() if k.endswith("/val")})
    hp_metrics.update({f"hparams/test_{k}": v for k, v in metrics["test"].items()})
    eces = {k: v for k, v in (metrics.get("calibration") or {}).items() if "_ece" in k}  # val_ece, test_ece, ...
    hp_metrics.update({f"hparams/{k}": v for k, v in eces.items()})
    per_class = per_class_metrics(metrics)
    for logger in loggers:
        if eces:
            logger.log_metrics({f"calibration/{k}": v for k, v in eces.items()})
        if per_class:
            logger.log_metrics(per_class)
        if isinstance(logger, TensorBoardLogger) and "hparams" in metrics:  # evaluate's metrics have none
            logger.log_hyperparams(metrics["hparams"], metrics=hp_metrics)
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # else the next run of a sweep (same process) would reuse it


# TensorBoard "Custom Scalars" tab: train and val of one metric on one chart, like the study's curves.
CURVES_LAYOUT = {
    "curves": {
        "loss": ["Multiline", ["loss/train", "loss/val"]],
        "accuracy": ["Multiline", ["acc/train", "acc/val"]],
    }
}


def run_hparams(cfg: DictConfig, image_size: int) -> dict[str, Any]:
    """The settings a study compares runs by (TensorBoard's HParams columns)."""
    from xray_cls.models.untrusted_files import network_name

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
