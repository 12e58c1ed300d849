"""evaluate's site protocol: a model measured honestly at another site.

`python -m xray_cls.evaluate ckpt=... data=folder data.root=<site> site.calibration_fraction=0.2 site.adapt=bn site.recalibrate=true`
1. splits the site's labeled images (the evaluated split) by patient, seeded (`site.seed`) and
   stratified by class, into a calibration part (`site.calibration_fraction` of each class's
   patients) and a test part;
2. adapts the model (`site.adapt`: bn or normalization, see xray_cls.evaluation.site) on the calibration part's
   images, or on every site image (`site.adapt_on=all`), their labels never read;
3. recalibrates its temperature and threshold on the calibration part alone (`site.recalibrate`);
4. tests the model as it was and as adapted and recalibrated on the test part alone, and reports
   both side by side (metrics.json's `site`, the console), with the patients of both parts.
The adapted and recalibrated model is written to `site.ckpt` in the evaluation folder, with its
provenance; `site_parts.csv` lists which image went to which part.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from xray_cls.core.files import path_text, write_csv
from xray_cls.core.task import PNEUMONIA
from xray_cls.evaluation.site import (
    adapted_module,
    check_adaptable,
    files_digest,
    in_batches,
    operating_point,
    recalibrated_choices,
)
from xray_cls.metrics.val_choices import ValChoices

log = logging.getLogger(__name__)


COMPARED = ["accuracy", "precision", "recall", "specificity", "f1", "auroc"]


def evaluate_site(cfg: DictConfig, out_dir: Path, trainer: Any, module: Any, datamodule: Any, ckpt: str) -> dict[str, Any]:
    from lightning.pytorch.loggers import TensorBoardLogger

    from xray_cls.core.checkpoint_files import write_checkpoint
    from xray_cls.evaluation.site import check_two_classes, checkpoint_with
    from xray_cls.models.checkpoints import read_checkpoint
    from xray_cls.reports.test_report import tested, write_report

    check_two_classes(module, "site.calibration_fraction (the site protocol)", ckpt)
    split = datamodule.splits["test"]
    names = module.hparams.preprocessing["class_names"]
    calibration, test, parts = site_parts(split, cfg.site.calibration_fraction, cfg.site.seed, names)
    if cfg.site.adapt != "none":
        check_adaptable(module.net, cfg.site.adapt, f"ckpt={ckpt}", "site.adapt")
    adapted, choices, adapted_on, calibration_logits = site_model(cfg, module, datamodule, split, calibration)
    _, before = tested(trainer, module, part(datamodule, split, test, module), module.choices, cfg)
    after_data = part(datamodule, split, test, adapted)
    results, after = tested(trainer, adapted, after_data, choices, cfg)
    record = {
        "source": str(ckpt), "adapt": cfg.site.adapt, "adapt_on": cfg.site.adapt_on, "adapted_on_images": adapted_on,
        "recalibrated": bool(cfg.site.recalibrate), "calibration_images": parts["calibration"]["per_class"],
        "calibration_digest": files_digest(split.paths[i] for i in calibration.tolist()) if split.paths else None,
    }
    metrics = {
        **after,
        "evaluation": {"checkpoint": str(ckpt), "split": cfg.split, "data": {k: v for k, v in cfg.data.items() if k in ("_target_", "path", "root")},
                       "preprocessing": dict(adapted.hparams.preprocessing), "site_checkpoint": "site.ckpt"},
        "site": {**record, "parts": parts, "before": {k: before[k] for k in ("threshold", "threshold_rule", "n_test", "confusion_matrix", "test")},
                 "operating_point": operating_point(choices, *calibration_logits, cfg.bootstrap.resamples, cfg.bootstrap.confidence,
                                                    cfg.seed, names)},
    }
    write_csv(out_dir / "site_parts.csv", part_rows(split, calibration, names), ["path", "part", "label"])
    write_report(trainer, adapted, after_data, results, metrics, cfg, out_dir, [TensorBoardLogger(save_dir=out_dir, name="", version="tensorboard")],
                 f"Site test part, adapted ({cfg.site.adapt}) and {'recalibrated' if cfg.site.recalibrate else 'not recalibrated'}",
                 gradcam=False, extra_lines="\n" + side_by_side(before, after, parts))
    write_checkpoint(out_dir / "site.ckpt", checkpoint_with(read_checkpoint(ckpt), adapted, "site", record))
    log.info("evaluation folder: %s", out_dir)
    return metrics


def site_parts(split: Any, fraction: float, seed: int, names: Sequence[str] = PNEUMONIA.classes
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(calibration indices, test indices, their sizes): the site's images split by patient."""
    from xray_cls.data import patient_split
    from xray_cls.data.patients import patient_groups

    patients = patient_groups(split.paths) if split.paths else [f"image:{i}" for i in range(len(split))]
    test, calibration = patient_split(split.labels.cpu(), patients, fraction, seed)

    def size(index: torch.Tensor) -> dict[str, Any]:
        return {"images": len(index), "patients": len({patients[i] for i in index.tolist()}),
                "per_class": dict(zip(names, torch.bincount(split.labels.cpu()[index], minlength=2).tolist()))}

    parts = {"calibration": size(calibration), "test": size(test), "fraction": fraction, "seed": seed}
    log.info("site: %s for calibration, %s for test", parts["calibration"], parts["test"])
    return calibration, test, parts


def site_model(cfg: DictConfig, module: Any, datamodule: Any, split: Any, calibration: torch.Tensor
               ) -> tuple[Any, ValChoices, int, tuple[torch.Tensor, torch.Tensor]]:
    """(the model adapted to the site, its choices, the number of images it was adapted on, its
    logits and the labels of the calibration part). The labels read are the calibration part's, to
    recalibrate and to report the operating point there: adaptation reads images."""
    adapted, adapted_on = module, 0
    if cfg.site.adapt != "none":
        images = split.gather(calibration) if cfg.site.adapt_on == "calibration" else split.images
        adapted, adapted_on = adapted_module(module, cfg.site.adapt, in_batches(images.cpu()))
    calibration_logits = part_logits(adapted, datamodule, split, calibration)  # before any temperature: choices leave them
    choices = adapted.choices
    if cfg.site.recalibrate:
        choices = recalibrated_choices(choices, *calibration_logits, cfg.target_sensitivity, module.hparams.preprocessing["class_names"])
    adapted = adapted if adapted is not module else copy.deepcopy(module)
    adapted.apply_choices(choices)
    return adapted, choices, adapted_on, calibration_logits


def part_logits(module: Any, datamodule: Any, split: Any, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from xray_cls.evaluation.logits import val_predictions

    return val_predictions(module, part(datamodule, split, index, module), "test")


def part(datamodule: Any, split: Any, index: torch.Tensor, module: Any) -> Any:
    """The datamodule serving only `index` of `split` as its test split, normalized as `module` normalizes."""
    served = copy.copy(datamodule)
    served.splits, served.test_split = {"test": split.subset(index.to(split.labels.device))}, "test"
    served.mean, served.std = module.hparams.preprocessing["mean"], module.hparams.preprocessing["std"]
    return served


def part_rows(split: Any, calibration: torch.Tensor, class_names: Sequence[str]) -> list[dict[str, Any]]:
    in_calibration = set(calibration.tolist())
    names = [path_text(p) for p in split.paths] if split.paths else [f"images[{i}]" for i in range(len(split))]
    labels = split.labels.tolist()
    return [{"path": names[i], "part": "calibration" if i in in_calibration else "test", "label": class_names[labels[i]]}
            for i in range(len(split))]


def side_by_side(before: dict[str, Any], after: dict[str, Any], parts: dict[str, Any]) -> str:
    """The test part's scores before and after, one line each, and the parts' sizes."""
    lines = [
        f"Site test part before / after ({parts['test']['images']} images of {parts['test']['patients']} patients; "
        f"calibration part {parts['calibration']['images']} images of {parts['calibration']['patients']} patients, "
        f"{'/'.join(parts['calibration']['per_class'])} {'/'.join(map(str, parts['calibration']['per_class'].values()))}):",
        f"  {'threshold':<22}{before['threshold']:.4f} / {after['threshold']:.4f}",
        *(f"  {name:<22}{before['test'][name]:.4f} / {after['test'][name]:.4f}" for name in COMPARED),
    ]
    return "\n".join(lines)
