"""`python -m xray_cls.pretrain`: a backbone learned from unlabeled X-rays, in four steps.

1. prepare the run folder (`outputs/pretrain/<date>/<time>/`): a new one, or that of the
   pretraining it resumes (`ckpt_path=<run>/checkpoints/last.ckpt`);
2. read the images, labels never learned from (`pretraining.sources`);
3. fit the method (`ssl=simclr|byol`, `pretraining.methods`) on two views of each image;
4. write backbone.pth (the backbone with its provenance, `models.backbone_files`) and metrics.json.

A classifier then starts from it: `python -m xray_cls model.weights=<run>/backbone.pth` with the
same model and data.image_size (docs/pretraining.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from xray_cls.core.errors import UserInputError
from xray_cls.core.files import write_json
from xray_cls.core.options import check_options, number
from xray_cls.data.options import DATA
from xray_cls.models.options import MODEL
from xray_cls.pretraining.options import PRETRAIN
from xray_cls.runtime.configs import CONFIG_DIR
from xray_cls.runtime.console import exit_on_user_error, quiet_libraries
from xray_cls.train import holding, prepare_run_folder
from xray_cls.training.resume import RunFolder, locate_run_folder, stop_advice

log = logging.getLogger(__name__)

OPTIONS = [*DATA, *MODEL, *PRETRAIN, number("trainer.max_epochs", 1, integer=True), number("seed", integer=True)]


def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """One pretraining; returns its metrics (metrics.json)."""
    from xray_cls.pretraining.module import read_pretraining_checkpoint

    check_options(cfg, OPTIONS)  # a bad value is refused before anything is read or written
    refuse_fine_tuning_options(cfg)
    quiet_libraries()
    folder = locate_run_folder(cfg, read_pretraining_checkpoint)
    with holding(folder.path), stop_advice(folder):
        prepare_run_folder(cfg, folder)
        images, labeled = read_images(cfg)
        module = build_module(cfg, images, labeled)
        started = time.monotonic()
        trainer = fit(cfg, folder, module, images, labeled)
        return write_results(cfg, folder.path, trainer, module, images, time.monotonic() - started)


def refuse_fine_tuning_options(cfg: DictConfig) -> None:
    """model.weights, freeze_epochs and backbone_lr_scale say how a classifier starts from a backbone: a pretraining starts from none."""
    for key, neutral in (("weights", None), ("freeze_epochs", 0), ("backbone_lr_scale", 1.0)):
        if cfg.model.get(key, neutral) != neutral:
            raise UserInputError(f"model.{key}={cfg.model[key]!r}: a pretraining learns its backbone from scratch; expected "
                                 f"model.{key}={'null' if neutral is None else neutral} (set it when fine-tuning the backbone.pth it writes)")


def read_images(cfg: DictConfig) -> tuple[Any, Any]:
    """(the unlabeled images, the labeled DataModule for the kNN monitor or None)."""
    import lightning as L
    from hydra.utils import instantiate

    from xray_cls.pretraining.sources import data_images, extra_images, joined

    L.seed_everything(cfg.seed, workers=True)
    parts, datamodule = [], None
    if cfg.pretrain.data:
        datamodule = instantiate(cfg.data, seed=cfg.seed, task=cfg.task)
        datamodule.setup("fit")
        parts.append(data_images(datamodule, cfg.pretrain.include_test))
    size = parts[0].images.shape[-1] if parts else cfg.data.get("image_size")
    if size is None:
        raise UserInputError("pretrain.data=false needs data.image_size=<px>: the size the sources' images are read at")
    cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.get("cache_dir") else None
    parts += extra_images(list(cfg.pretrain.sources), int(size), cfg.data.get("geometry", "crop"), cache_dir, cfg.pretrain.include_test)
    images = joined(parts)
    for source, count in images.counts.items():
        log.info("pretraining on %d image(s) of %s", count, source)
    knn = cfg.pretrain.knn_k > 0 and datamodule is not None and {"train", "val"} <= set(datamodule.splits)
    return images, datamodule if knn else None


def build_module(cfg: DictConfig, images: Any, labeled: Any) -> Any:
    from xray_cls.data.splits import chunks_mean_std
    from xray_cls.models.pretrained import PRETRAINING_KEYS
    from xray_cls.pretraining.module import SelfSupervised

    mean, std = chunks_mean_std(images.images[i : i + 4096] for i in range(0, len(images.images), 4096))
    net = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in PRETRAINING_KEYS}
    net.update(in_channels=int(images.images.shape[1]), image_size=int(images.images.shape[-1]))
    preprocessing = {"image_size": net["image_size"], "in_channels": net["in_channels"], "mean": mean, "std": std,
                     "geometry": cfg.data.get("geometry", "crop"), "normalization": "pretraining"}
    return SelfSupervised(
        net=net, method=OmegaConf.to_container(cfg.ssl, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        preprocessing=preprocessing, num_classes=len(labeled.class_names) if labeled is not None else 2,
        knn_k=int(cfg.pretrain.knn_k), knn_temperature=float(cfg.pretrain.knn_temperature),
    )


def fit(cfg: DictConfig, folder: RunFolder, module: Any, images: Any, labeled: Any) -> Any:
    from xray_cls.training.trainer import build_trainer

    trainer = build_trainer(cfg, folder.path)
    if folder.resume_from is not None:
        from lightning.pytorch.utilities import rank_zero_only

        from xray_cls.training.resume import log_to_run_folder, warn_config_changes
        from xray_cls.training.training_state import check_training_state

        if folder.asked_to_resume and rank_zero_only.rank == 0:  # a requeued job logs there already
            log_to_run_folder(folder.path, "pretrain.log")
        log.info("resuming the pretraining %s from %s", folder.path, folder.resume_from)
        check_same_network(folder, module)
        warn_config_changes(folder.path, cfg)
        check_training_state(folder.resume_from, folder.checkpoint, trainer, module)
        folder.checkpoint = None  # checked: Lightning reads the file itself
    train, val = loaders(cfg, trainer, module, images, labeled)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val, ckpt_path=folder.resume_from, weights_only=True)
    return trainer


def check_same_network(folder: RunFolder, module: Any) -> None:
    """A pretraining resumes only with the network and images it started with: one line naming what differs."""
    from xray_cls.models.networks import canonical_config

    saved = folder.checkpoint["hyper_parameters"]
    trained, now = canonical_config(saved["net"]), canonical_config(module.hparams.net)
    differ = [f"model.{k}={trained.get(k)!r} there, {now.get(k)!r} here" for k in sorted(trained.keys() | now.keys())
              if trained.get(k) != now.get(k)]
    if differ:
        raise UserInputError(f"ckpt_path={folder.resume_from} is a pretraining of another network or image size "
                             f"({'; '.join(differ)}); resume with the overrides it was started with (see its config.yaml)")


def loaders(cfg: DictConfig, trainer: Any, module: Any, images: Any, labeled: Any) -> tuple[Any, Any]:
    """The views of every image, in the seed's order of each epoch (a resumed epoch skips the
    batches it trained), and, for the kNN monitor, data's train (the bank) and val splits."""
    import torch
    from torch.utils.data import DataLoader

    from xray_cls.data.splits import EpochShuffle, SplitDataset, batch_as_is
    from xray_cls.pretraining.views import Views, view_transform

    prep = module.hparams.preprocessing
    views = Views(images.images, view_transform(cfg.views, prep["image_size"], prep["mean"], prep["std"]))
    per_process = -(-len(views) // trainer.world_size)  # each DDP process's share of the images
    if per_process < 2:
        raise UserInputError(f"pretrain: {len(views)} image(s) for {trainer.world_size} process(es); expected at least 2 a "
                             "process (views are compared within a batch)")
    batch_size = min(int(cfg.pretrain.batch_size), per_process)
    batches_done = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.ready
    sampler = EpochShuffle(len(views), cfg.seed, batch_size, batches_done) if trainer.world_size == 1 else None
    workers = int(cfg.data.get("num_workers", 0))
    train = DataLoader(views, batch_size=batch_size, sampler=sampler, shuffle=sampler is None, drop_last=per_process > batch_size,
                       num_workers=workers, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(cfg.seed))
    if labeled is None:
        return train, None
    # Their own generators: a loader drawing its seed from the global one would shift the views' draws.
    val = [DataLoader(SplitDataset(labeled.splits[name]), batch_size=512, collate_fn=batch_as_is, generator=torch.Generator())
           for name in ("train", "val")]
    return train, val


def write_results(cfg: DictConfig, out_dir: Path, trainer: Any, module: Any, images: Any, seconds: float) -> dict[str, Any]:
    from xray_cls.core.checkpoint_files import write_checkpoint
    from xray_cls.models.backbone_files import backbone_record

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k and not k.endswith("_step")}
    provenance = {
        "method": str(cfg.ssl._target_).rsplit(".", 1)[-1], "epochs": trainer.current_epoch,
        "sources": images.counts, "images": len(images.names), "files_sha256": images.files_sha256(),
        "include_test": bool(cfg.pretrain.include_test), "image_size": module.hparams.preprocessing["image_size"],
        "seed": cfg.seed, "run": str(out_dir), "knn_acc_val": metrics.get("knn_acc/val"),
    }
    if not trainer.is_global_zero:
        return {}
    net = {k: v for k, v in module.hparams.net.items() if k not in ("in_channels", "image_size")}
    write_checkpoint(out_dir / "backbone.pth", backbone_record(net, module.hparams.preprocessing, provenance,
                                                               module.features.backbone_state()))
    result = {"pretraining": provenance, "last_epoch": metrics, "train_seconds": round(seconds, 2), "backbone": "backbone.pth"}
    write_json(out_dir / "metrics.json", result)
    log.info("backbone: %s (model.weights=%s)", out_dir / "backbone.pth", out_dir / "backbone.pth")
    print(f"pretrained {provenance['method']} for {provenance['epochs']} epoch(s) on {provenance['images']} image(s): "
          f"{out_dir / 'backbone.pth'}", flush=True)
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="pretrain")
def main(cfg: DictConfig) -> Any:
    return exit_on_user_error(lambda: pretrain(cfg))


if __name__ == "__main__":
    main()
