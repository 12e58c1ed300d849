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

from xray_cls import resolvers  # noqa: F401  the configs' resolvers, registered before Hydra composes
from xray_cls.cli import checkpoint_command, exit_on_user_error
from xray_cls.config import CONFIG_DIR
from xray_cls.errors import UserInputError

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    with checkpoint_command(cfg, "evaluate", ["metrics.json"], "an evaluation") as out_dir:
        return evaluate_in(cfg, out_dir)


def evaluate_in(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """The evaluation of `cfg.ckpt` (one checkpoint, or their average) on `cfg.split` of `cfg.data`."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from xray_cls import run_report
    from xray_cls.data import trained_geometry
    from xray_cls.ensemble import TTA_VIEWS, checkpoint_paths, describe, load_averaged

    paths = checkpoint_paths(cfg.ckpt)
    tta = bool(cfg.tta)
    averaged = len(paths) > 1 or tta
    module = load_averaged(paths, tta)
    preprocessing = module.hparams.preprocessing
    geometry = trained_geometry(preprocessing, paths[0])
    # Read once, and only for folders: the only data whose runs draw splits from train.
    recorded = recorded_splits(Path(paths[0])) if cfg.data.get("root") else {}
    module.apply_choices(evaluation_choices(cfg, module, averaged, recorded, geometry))
    if cfg.split == "val" and "val" not in recorded and cfg.data.get("root"):
        log.warning("%s records no val split drawn from train: a val split drawn from data.root is new to it", paths[0])
    datamodule = evaluation_data(cfg, preprocessing, geometry, cfg.split, recorded)
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    if cfg.site.calibration_fraction is not None:  # another site's images: adapt and recalibrate on a part, test on the rest
        if averaged:
            raise UserInputError("site.calibration_fraction: the site protocol adapts and recalibrates one checkpoint; "
                                 "expected ckpt=<one checkpoint> without tta")
        from xray_cls.site_protocol import evaluate_site

        return evaluate_site(cfg, out_dir, trainer, module, datamodule, paths[0])
    evaluation = {
        "checkpoint": paths[0] if not averaged else None,
        **({"ensemble": {"checkpoints": paths, "tta": tta, "tta_views": TTA_VIEWS if tta else 1}} if averaged else {}),
        "split": cfg.split,
        "data": {k: v for k, v in cfg.data.items() if k in ("_target_", "path", "root")},
        "preprocessing": preprocessing,
    }
    tensorboard = TensorBoardLogger(save_dir=out_dir, name="", version="tensorboard")
    metrics = run_report.test_and_report(
        trainer, module, datamodule, module.choices, cfg, out_dir, evaluation, [tensorboard],
        title=f"{cfg.split.capitalize()} results of {paths[0] if not averaged else describe(paths, tta)}",
        gradcam=cfg.split == "test" and not averaged,  # Grad-CAM explains one network
    )
    log.info("evaluation folder: %s", out_dir)
    return metrics


def evaluation_data(cfg: DictConfig, preprocessing: dict[str, Any], geometry: str, split: str, recorded: dict[str, list[str]]) -> Any:
    """`split` of `cfg.data`, read and prepared as the checkpoint's model was trained."""
    from hydra.utils import instantiate

    from xray_cls.data import Evaluation

    datamodule = instantiate(cfg.data, seed=cfg.seed, image_size=preprocessing["image_size"], geometry=geometry, aug="none",
                             task=preprocessing.get("task"), **({"classes": None} if "classes" in cfg.data else {}))
    datamodule.setup_evaluation(Evaluation(split, preprocessing, recorded))
    return datamodule


def evaluation_choices(cfg: DictConfig, module: Any, averaged: bool, recorded: dict[str, list[str]], geometry: str) -> Any:
    """The run's own choices (its checkpoint's); `threshold=` given by the user; or, for averaged
    probabilities, whose members' thresholds were chosen for them alone, a threshold chosen on the
    val split (of data.*, or the one the first checkpoint's run drew from train) by the first
    checkpoint's threshold rule."""
    from xray_cls.val_choices import choose_threshold_on_val, val_predictions

    choices = module.choices
    if cfg.threshold is not None and not module.binary:
        raise UserInputError(f"threshold={cfg.threshold} applies to two classes; this model tells {module.num_classes} apart "
                             "and calls each image its most probable class: expected threshold=null")
    if cfg.threshold is not None:
        return choices.with_threshold(cfg.threshold)
    if not averaged or not module.binary:  # K classes: the most probable class, averaged or not
        return choices
    val_data = evaluation_data(cfg, module.hparams.preprocessing, geometry, "val", recorded)
    logits, labels = val_predictions(module, val_data)
    log.info("choosing the threshold of the averaged probabilities on %d val images", len(labels))
    return choose_threshold_on_val(logits.sigmoid(), labels, choices.rule, choices.threshold, cfg.target_sensitivity)


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
