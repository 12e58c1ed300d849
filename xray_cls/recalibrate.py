"""`python -m xray_cls.recalibrate ckpt=... data.root=<labeled site images>`: a model's choices made again at another site.

The checkpoint's temperature (when its run fitted one) and threshold are chosen again, by its own
threshold rule, on a small labeled folder of the site (its `NORMAL/` and `PNEUMONIA/` folders, or
its `test/`), and written to `recalibrated.ckpt` in the output folder
(`outputs/recalibrate/<date>/<time>/`), with its provenance. `recalibration.json` and the console
give the new operating point on those images, with bootstrap intervals and the images per class
it was chosen on. Keep the images you then judge the model on apart from these: evaluate's
site protocol (`site.calibration_fraction=`) does both in one command.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from xray_cls.data.options import DATA
from xray_cls.metrics.options import SCORING
from xray_cls.runtime.configs import CONFIG_DIR
from xray_cls.runtime.console import checkpoint_command, exit_on_user_error

log = logging.getLogger(__name__)

OPTIONS = [*DATA, *SCORING]  # checked before anything is read


def recalibrate(cfg: DictConfig) -> dict[str, Any]:
    """Recalibrate `cfg.ckpt` on the labeled images of `cfg.data`; returns the new operating point."""
    from xray_cls.core.checkpoint_files import write_checkpoint
    from xray_cls.core.files import write_json
    from xray_cls.data import trained_geometry
    from xray_cls.evaluation.logits import val_predictions
    from xray_cls.evaluation.reading import evaluation_data
    from xray_cls.evaluation.site import check_two_classes, checkpoint_with, files_digest, operating_point, recalibrated_choices
    from xray_cls.models.checkpoints import load_classifier, read_checkpoint

    with checkpoint_command(cfg, OPTIONS, ["recalibrated.ckpt"], "a recalibrated checkpoint") as out_dir:
        module = load_classifier(cfg.ckpt)
        check_two_classes(module, "recalibrate", cfg.ckpt)
        prep = module.hparams.preprocessing
        datamodule = evaluation_data(cfg, prep, trained_geometry(prep, cfg.ckpt), "test", {})
        logits, labels = val_predictions(module, datamodule, "test")
        previous = module.choices
        names = prep["class_names"]
        module.apply_choices(recalibrated_choices(previous, logits, labels, cfg.target_sensitivity, names))
        point = operating_point(module.choices, logits, labels, cfg.bootstrap.resamples, cfg.bootstrap.confidence, cfg.seed, names)
        paths = datamodule.splits["test"].paths or []
        record = {"source": str(cfg.ckpt), "images": point["images"], "files_digest": files_digest(paths),
                  "folder": str(cfg.data.get("root") or cfg.data.get("path")), "previous": previous.rule_record(),
                  "previous_temperature": previous.temperature}
        write_checkpoint(out_dir / "recalibrated.ckpt", checkpoint_with(read_checkpoint(cfg.ckpt), module, "recalibration", record))
        write_json(out_dir / "recalibration.json", {**point, "previous": record["previous"], "checkpoint": "recalibrated.ckpt"})
    print(point_table(point, previous, out_dir / "recalibrated.ckpt"), flush=True)
    return point


def point_table(point: dict[str, Any], previous: Any, path: Path) -> str:
    ci = point.get("ci", {})

    def interval(name: str) -> str:
        return f"  ({100 * ci['confidence']:.0f}% CI {ci[name][0]:.4f}-{ci[name][1]:.4f})" if name in ci else ""

    return "\n".join([
        f"Recalibrated on {' and '.join(f'{n} {c}' for c, n in point['images'].items())} images ({point['rule']} rule): {path}",
        f"  {'threshold':<22}{point['threshold']:.4f}  (was {previous.threshold:.4f})",
        f"  {'temperature':<22}{point['temperature']:.4f}  (was {previous.temperature:.4f})",
        f"  {'sensitivity':<22}{point['sensitivity']:.4f}{interval('sensitivity')}",
        f"  {'specificity':<22}{point['specificity']:.4f}{interval('specificity')}",
    ])


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="recalibrate")
def main(cfg: DictConfig) -> Any:
    exit_on_user_error(lambda: recalibrate(cfg))


if __name__ == "__main__":
    main()
