"""The sites the accuracy benchmarks take a trained run to, written as labeled folders, and the
bound a threshold puts on a model there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from xray_cls.data import trained_geometry
from xray_cls.evaluation.reading import evaluation_data
from xray_cls.runtime.configs import CONFIG_DIR


def write_development_test(root: Path, folder: Path, seed: int = 1) -> Path:
    """Links to the development test a folder run draws from `root`'s train/ by patient (as
    `+experiment=best_folder seed=1` draws it), in folder/{NORMAL,PNEUMONIA}/, file names kept
    (they name the patients)."""
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=best_folder", f"data.root='{root}'", f"seed={seed}"])
    datamodule = instantiate(cfg.data, seed=cfg.seed, task=cfg.task)
    datamodule.setup("fit")
    if "test" not in datamodule.derived:
        raise SystemExit(f"--site {root}: it has its own test/ folder, and a run draws no development test from it; "
                         "expected a folder of train/ alone (or pass its test/ as --site with --folder)")
    for name in datamodule.derived["test"]:
        source = root / name
        target = folder / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source.resolve())
    return folder


def write_bundled_test(folder: Path) -> Path:
    """PneumoniaMNIST's test split as PNGs in folder/{NORMAL,PNEUMONIA}/: Kaggle's test images at 28 px."""
    import numpy as np
    from PIL import Image

    from xray_cls.data import BUNDLED_NPZ

    arrays = np.load(BUNDLED_NPZ)
    for i, (image, label) in enumerate(zip(arrays["test_images"], arrays["test_labels"][:, 0])):
        target = folder / ("NORMAL", "PNEUMONIA")[int(label)] / f"test_{i:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target)
    return folder


def split_of(ckpt: Path, prep: dict[str, Any], data: list[str], split: str, recorded: dict[str, list[str]]) -> Any:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt='{ckpt}'", f"split={split}", *data])
    return evaluation_data(cfg, prep, trained_geometry(prep, ckpt), split, recorded).splits[split]


def threshold_bounds(probs: torch.Tensor, labels: torch.Tensor, min_specificity: float = 0.9) -> tuple[float, float]:
    """(the best accuracy of any threshold, the best of those whose specificity is >= min_specificity).
    They read the labels of the images scored: limits to report, never a choice."""
    cuts = torch.cat([torch.tensor([-1.0], dtype=probs.dtype), probs.unique(), torch.tensor([1.0], dtype=probs.dtype)])  # all sick .. none
    called, positive = probs[None] > cuts[:, None], labels.bool()
    accuracy = (called == positive).float().mean(1)
    specificity = (~called & ~positive).sum(1) / (~positive).sum()
    return float(accuracy.max()), float(accuracy[specificity >= min_specificity].max())


def test_part_bounds(ckpt: Path, site: Path, fraction: float, seed: int = 0) -> dict[str, float]:
    """threshold_bounds of the model as it is on the test part evaluate's site protocol keeps
    (`site.calibration_fraction=fraction`, `site.seed=seed`)."""
    from xray_cls.data import normalize
    from xray_cls.evaluation.site_protocol import site_parts
    from xray_cls.models.checkpoints import load_classifier

    module = load_classifier(ckpt)
    prep = module.hparams.preprocessing
    split = split_of(ckpt, prep, ["data=folder", f"data.root='{site}'"], "test", {})
    _, test, _ = site_parts(split, fraction, seed, prep["class_names"])
    part = split.subset(test)
    probs = torch.sigmoid(module.predict_logits(normalize(part.images, prep["mean"], prep["std"])).flatten().double())
    best, bound = threshold_bounds(probs, part.labels)
    return {"best_acc": best, "best_acc_spec90": bound}
