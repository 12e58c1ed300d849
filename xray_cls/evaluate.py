"""`python -m xray_cls.evaluate ckpt=... [data=...] [split=test] [tta=true]`: a trained model's test metrics on any data.

`ckpt=[a.ckpt,b.ckpt,c.ckpt]` evaluates the ensemble of their averaged probabilities, and
`tta=true` averages over shifted views of each image (see xray_cls.evaluation.ensemble); the threshold of an
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

from xray_cls.core.errors import UserInputError
from xray_cls.core.legacy_names import forwarding
from xray_cls.core.options import number
from xray_cls.data.options import DATA
from xray_cls.evaluation.options import EVALUATION, SITE
from xray_cls.evaluation.reading import evaluation_choices, evaluation_data, recorded_splits
from xray_cls.metrics.options import SCORING
from xray_cls.runtime.configs import CONFIG_DIR
from xray_cls.runtime.console import checkpoint_command, exit_on_user_error

log = logging.getLogger(__name__)

OPTIONS = [*DATA, *SCORING, *EVALUATION, *SITE, number("gradcam_samples", 0, integer=True), number("seed", integer=True)]  # checked before anything is read


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    with checkpoint_command(cfg, OPTIONS, ["metrics.json"], "an evaluation") as out_dir:
        return evaluate_in(cfg, out_dir)


def evaluate_in(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """The evaluation of `cfg.ckpt` (one checkpoint, or their average) on `cfg.split` of `cfg.data`."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from xray_cls.data import trained_geometry
    from xray_cls.evaluation.ensemble import TTA_VIEWS, checkpoint_paths, describe, load_averaged
    from xray_cls.reports.test_report import test_and_report

    check_site_options(cfg)
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
        from xray_cls.evaluation.site_protocol import evaluate_site

        return evaluate_site(cfg, out_dir, trainer, module, datamodule, paths[0])
    evaluation = {
        "checkpoint": paths[0] if not averaged else None,
        **({"ensemble": {"checkpoints": paths, "tta": tta, "tta_views": TTA_VIEWS if tta else 1}} if averaged else {}),
        "split": cfg.split,
        "data": {k: v for k, v in cfg.data.items() if k in ("_target_", "path", "root")},
        "preprocessing": preprocessing,
    }
    tensorboard = TensorBoardLogger(save_dir=out_dir, name="", version="tensorboard")
    metrics = test_and_report(
        trainer, module, datamodule, module.choices, cfg, out_dir, evaluation, [tensorboard],
        title=f"{cfg.split.capitalize()} results of {paths[0] if not averaged else describe(paths, tta)}",
        gradcam=cfg.split == "test" and not averaged,  # Grad-CAM explains one network
    )
    log.info("evaluation folder: %s", out_dir)
    return metrics


def check_site_options(cfg: DictConfig) -> None:
    """site.adapt, site.recalibrate and site.choose act on a calibration part: without one they would do nothing, silently."""
    asked = [f"site.{k}={str(v).lower()}" for k, v in (("adapt", cfg.site.adapt), ("recalibrate", cfg.site.recalibrate),
                                                       ("choose", cfg.site.choose)) if v not in ("none", False)]
    if asked and cfg.site.calibration_fraction is None:
        raise UserInputError(f"{' '.join(asked)} acts on a site's calibration part, and site.calibration_fraction is null; "
                             "expected site.calibration_fraction=<the share of the site's patients to calibrate on>, e.g. 0.2")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: evaluate(cfg))



__getattr__ = forwarding(__name__)  # the names that moved out of this module, from where they are now

if __name__ == "__main__":
    main()
