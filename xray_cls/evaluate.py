"""`python -m xray_cls.evaluate ckpt=... [data=...] [split=test] [tta=true]`: a trained model's test metrics on any data.

`ckpt=[a.ckpt,b.ckpt,c.ckpt]` evaluates the ensemble of their averaged probabilities, and
`tta=true` averages over shifted views of each image (see xray_cls.ensemble); the threshold of an
average is chosen on val by the first checkpoint's threshold rule.

The model prepares images as it was trained: image size, geometry (crop or stretch) and
normalization come from its checkpoint, not from `data.*`. The output folder (`outputs/evaluate/<date>/<time>/`) gets
metrics.json, figures/ and a TensorBoard event file, like a run's test.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from xray_cls.cli import CONFIG_DIR, exit_on_user_error, quiet_libraries, refuse_existing, require

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import TensorBoardLogger

    from xray_cls import run_report
    from xray_cls.data import trained_geometry
    from xray_cls.ensemble import TTA_VIEWS, checkpoint_paths, describe, load_averaged

    quiet_libraries()
    require(cfg, "ckpt", "outputs/<run>/checkpoints/best.ckpt")
    out_dir = Path(cfg.paths.output_dir)
    refuse_existing(out_dir / "metrics.json", "an evaluation", "paths.output_dir")
    paths = checkpoint_paths(cfg.ckpt)
    tta = bool(cfg.get("tta", False))
    averaged = len(paths) > 1 or tta
    module = load_averaged(paths, tta)
    preprocessing = module.hparams.preprocessing
    geometry = trained_geometry(preprocessing, paths[0])
    # Read once, and only for folders: the only data whose runs draw splits from train.
    recorded = recorded_splits(Path(paths[0])) if cfg.data.get("root") else {}
    threshold = module.hparams.threshold_rule or {"rule": "fixed", "threshold": module.hparams.threshold}
    if cfg.threshold is not None:
        threshold = {"rule": "fixed", "threshold": float(cfg.threshold)}
    elif averaged:  # the members' thresholds were chosen for them alone
        threshold = averaged_threshold(cfg, module, recorded, geometry)
    module.set_threshold(threshold["threshold"])

    datamodule = instantiate(
        cfg.data, seed=cfg.seed, image_size=preprocessing["image_size"], geometry=geometry, aug="none"
    )
    if cfg.split == "val" and "val" not in recorded and cfg.data.get("root"):
        log.warning("%s records no val split drawn from train: a val split drawn from data.root is new to it", paths[0])
    datamodule.evaluate_split(cfg.split, recorded)
    datamodule.setup("test")
    datamodule.use_preprocessing(preprocessing)
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    evaluation = {
        "checkpoint": paths[0] if not averaged else None,
        **({"ensemble": {"checkpoints": paths, "tta": tta, "tta_views": TTA_VIEWS if tta else 1}} if averaged else {}),
        "split": cfg.split,
        "data": {k: v for k, v in cfg.data.items() if k in ("_target_", "path", "root")},
        "preprocessing": preprocessing,
    }
    tensorboard = TensorBoardLogger(save_dir=out_dir, name="", version="tensorboard")
    metrics = run_report.test_and_report(
        trainer, module, datamodule, threshold, cfg, out_dir, evaluation, [tensorboard],
        title=f"{cfg.split.capitalize()} results of {paths[0] if not averaged else describe(paths, tta)}",
        gradcam=cfg.split == "test" and not averaged,  # Grad-CAM explains one network
    )
    log.info("evaluation folder: %s", out_dir)
    return metrics


def averaged_threshold(cfg: DictConfig, module: Any, recorded: dict[str, list[str]], geometry: str) -> dict[str, Any]:
    """The threshold of averaged probabilities, chosen on the val split (of data.*, or the one the
    first checkpoint's run drew from train, in `recorded`) by the first checkpoint's threshold rule."""
    import torch
    from hydra.utils import instantiate

    from xray_cls.metrics import choose_threshold
    from xray_cls.train import val_predictions

    rule = (module.hparams.threshold_rule or {}).get("rule", "fixed")
    prep = module.hparams.preprocessing
    val_data = instantiate(cfg.data, seed=cfg.seed, image_size=prep["image_size"], geometry=geometry, aug="none")
    val_data.evaluate_split("val", recorded)
    val_data.setup("test")
    val_data.use_preprocessing(prep)
    logits, labels = val_predictions(module, val_data)
    probs = torch.sigmoid(logits / module.temperature)
    chosen = choose_threshold(rule, probs, labels, module.hparams.threshold, cfg.target_sensitivity)
    log.info("threshold %.4f of the averaged probabilities (%s rule on %d val images)", chosen["threshold"], rule, len(labels))
    return chosen


def recorded_splits(ckpt: Path) -> dict[str, list[str]]:
    """The val and test images (paths relative to data.root) a run drew from train, as its
    checkpoint records them; empty for runs whose folder had its own."""
    from xray_cls.checkpoint import read_checkpoint

    state = read_checkpoint(ckpt).get("ImageFolderDataModule")
    if not isinstance(state, dict):
        return {}
    drawn = {name: state.get(f"derived_{name}") for name in ("val", "test")}
    return {name: [str(path) for path in paths] for name, paths in drawn.items() if isinstance(paths, list)}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
