"""What `evaluate` and `recalibrate` read for a trained model: the data prepared as the model was
trained (its image size, geometry, normalization, the splits its run drew from train), and the
threshold an evaluation uses."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from xray_cls.core.errors import UserInputError

log = logging.getLogger(__name__)


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
    from xray_cls.evaluation.logits import val_predictions
    from xray_cls.metrics.val_choices import choose_threshold_on_val

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
    from xray_cls.models.checkpoints import read_checkpoint

    state = read_checkpoint(ckpt).get("ImageFolderDataModule")
    if not isinstance(state, dict):
        return {}
    drawn = {name: state.get(f"derived_{name}") for name in ("val", "test")}
    return {name: [str(path) for path in paths] for name, paths in drawn.items() if isinstance(paths, list)}
