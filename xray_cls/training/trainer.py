"""The Trainer a run fits with: its configured loggers and callbacks (with the ones every run
needs), its precision, and a checkpoint writer that never leaves a truncated file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig

from xray_cls.core.checkpoint_files import write_checkpoint
from xray_cls.core.errors import UserInputError

log = logging.getLogger(__name__)


class DurableCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through `write_checkpoint`. Lightning's own writes through an
    fsspec transaction that stages the file in $TMPDIR and moves it into place: across file systems
    that move is a copy, which a kill leaves truncated (a 0-byte last.ckpt), and a small $TMPDIR
    fails the run although the run folder has room."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options; got {storage_options!r}")
        write_checkpoint(Path(path), checkpoint)


def build_trainer(cfg: DictConfig, out_dir: Path) -> Any:
    """The configured Trainer with the `logger` and `callbacks` configs; checkpoints go to
    out_dir/checkpoints (callbacks.model_checkpoint), which resuming and testing rely on."""
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from xray_cls.training.loggers import CURVES_LAYOUT, build_loggers

    callbacks = run_callbacks(cfg, out_dir)
    # In a SLURM job, a restarted job resumes its run from last.ckpt (resume.requeued_checkpoint);
    # Lightning's own SIGUSR1 auto-requeue, with its separate hpc_ckpt files, stays off.
    plugins: list[Any] = [DurableCheckpointIO()]  # checkpoints written beside their final name, never via $TMPDIR
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    loggers = build_loggers(cfg.get("logger"), out_dir)
    sync = {"sync_batchnorm": False} if cfg.trainer.get("sync_batchnorm") and not on_gpu(cfg.trainer) else {}
    if sync:  # torch's SyncBatchNorm refuses CPU modules; DDP on CPUs keeps each process's batch norm
        log.info("trainer.sync_batchnorm: batch norm is synchronized on GPUs only; each CPU process keeps its own")
    trainer = instantiate(
        cfg.trainer, logger=loggers, callbacks=callbacks, default_root_dir=out_dir,
        precision=supported_precision(cfg.trainer), plugins=plugins, **sync,
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

    from xray_cls.training.callbacks import ProgressBar, ResumableTraining, ReturnFreedMemory

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
        from xray_cls.training.fine_tuning import FreezeBackbone

        callbacks.append(FreezeBackbone(freeze_epochs))
    # callbacks.progress_bar (part of callbacks=default); Lightning refuses a bar it was told not to show.
    bars = [c for c in callbacks if isinstance(c, LightningProgressBar)]
    if not cfg.trainer.get("enable_progress_bar", True):
        return [c for c in callbacks if not isinstance(c, LightningProgressBar)]
    return callbacks if bars else [*callbacks, ProgressBar()]  # a callbacks list without it: the same bar


def supported_precision(trainer_cfg: DictConfig) -> str:
    """The precision to train in: `auto` is bf16-mixed on a GPU (16-mixed on GPUs without bf16)
    and 32-true elsewhere; an explicit bf16 setting also falls back to 16-mixed on such GPUs."""
    precision = str(trainer_cfg.precision)
    gpu = on_gpu(trainer_cfg)
    if precision == "auto":
        precision = "bf16-mixed" if gpu else "32-true"
    if precision.startswith("bf16") and gpu and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bf16: using 16-mixed precision instead of %s", precision)
        return "16-mixed"
    return precision


def on_gpu(trainer_cfg: DictConfig) -> bool:
    return trainer_cfg.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
