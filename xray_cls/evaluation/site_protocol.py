"""evaluate's site protocol: a model measured honestly at another site.

`python -m xray_cls.evaluate ckpt=... data=folder data.root=<site> site.calibration_fraction=0.2 site.choose=true`
1. splits the site's labeled images (the evaluated split) by patient, seeded (`site.seed`) and
   stratified by class, into a calibration part (`site.calibration_fraction` of each class's
   patients) and a test part;
2. adapts the model (`site.adapt`: bn or normalization, see xray_cls.evaluation.site) on every
   site image (`site.adapt_on=all`, the default: what a deployed model sees) or on the calibration
   part's alone, their labels never read;
3. recalibrates its temperature and threshold on the calibration part alone (`site.recalibrate`);
   or, with `site.choose=true`, chooses among as it is, adapted, recalibrated and both on the
   calibration part's labels (xray_cls.evaluation.site_choice);
4. tests the model as it was and as adapted, recalibrated or chosen on the test part alone, and
   reports them side by side (metrics.json's `site`, the console), with the patients of both parts.
The test part's labels are read only to score it. The model applied is written to `site.ckpt` in
the evaluation folder, with its provenance; `site_parts.csv` lists which image went to which part
and which images the adaptation read.
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
from xray_cls.evaluation.site_choice import (
    CANDIDATES,
    calls_at,
    candidate_name,
    check_resamples,
    choice_lines,
    choose,
    out_of_fold_calls,
)
from xray_cls.metrics.val_choices import ValChoices

log = logging.getLogger(__name__)

Candidate = tuple[Any, ValChoices, tuple[torch.Tensor, torch.Tensor]]  # a model, its choices, the calibration logits and labels


COMPARED = ["accuracy", "precision", "recall", "specificity", "f1", "auroc"]


def evaluate_site(cfg: DictConfig, out_dir: Path, trainer: Any, module: Any, datamodule: Any, ckpt: str) -> dict[str, Any]:
    from lightning.pytorch.loggers import TensorBoardLogger

    from xray_cls.core.checkpoint_files import write_checkpoint
    from xray_cls.evaluation.site import check_two_classes, checkpoint_with
    from xray_cls.models.checkpoints import read_checkpoint
    from xray_cls.reports.test_report import tested, write_report

    check_two_classes(module, "site.calibration_fraction (the site protocol)", ckpt)
    if cfg.site.choose:
        check_resamples(cfg.bootstrap.resamples)
    split = datamodule.splits["test"]
    names = module.hparams.preprocessing["class_names"]
    calibration, test, parts = site_parts(split, cfg.site.calibration_fraction, cfg.site.seed, names)
    method = adaptation_method(cfg, module.net, ckpt)
    candidates, adaptation, choice = site_candidates(cfg, method, module, datamodule, split, calibration)
    chosen = choice["chosen"] if choice else candidate_name(method != "none", bool(cfg.site.recalibrate))
    scored = {name: tested(trainer, model, part(datamodule, split, test, model), choices, cfg)
              for name, (model, choices, _) in candidates.items()}
    adapted, choices, calibration_logits = candidates[chosen]
    after_data = part(datamodule, split, test, adapted)
    results, after = scored[chosen]
    before = scored["as_is"][1] if "as_is" in scored else tested(trainer, module, part(datamodule, split, test, module), module.choices, cfg)[1]
    record = {
        "source": str(ckpt), "adapt": method, "adapted_on": adaptation, "recalibrated": is_recalibrated(chosen),
        "applied": chosen, "calibration_images": parts["calibration"]["per_class"],
        "calibration_digest": files_digest(split.paths[i] for i in calibration.tolist()) if split.paths else None,
    }
    site = {**record, "parts": parts, "before": {k: before[k] for k in ("threshold", "threshold_rule", "n_test", "confusion_matrix", "test")},
            "operating_point": operating_point(choices, *calibration_logits, cfg.bootstrap.resamples, cfg.bootstrap.confidence,
                                               cfg.seed, names)}
    if choice:
        site["choice"] = choice
        site["candidates"] = {name: {k: m[k] for k in ("threshold", "n_test", "confusion_matrix", "test")} for name, (_, m) in scored.items()}
    metrics = {
        **after,
        "evaluation": {"checkpoint": str(ckpt), "split": cfg.split, "data": {k: v for k, v in cfg.data.items() if k in ("_target_", "path", "root")},
                       "preprocessing": dict(adapted.hparams.preprocessing), "site_checkpoint": "site.ckpt"},
        "site": site,
    }
    write_csv(out_dir / "site_parts.csv", part_rows(split, calibration, names, adaptation["part"]), ["path", "part", "label", "adapted_on"])
    lines = choice_lines(choice, {n: m for n, (_, m) in scored.items()}, COMPARED) if choice else side_by_side(before, after, parts)
    lines = adaptation_line(method, adaptation) + lines
    write_report(trainer, adapted, after_data, results, metrics, cfg, out_dir, [TensorBoardLogger(save_dir=out_dir, name="", version="tensorboard")],
                 f"Site test part, {chosen.replace('_', ' ')}" + (" (chosen on the calibration part)" if choice else ""),
                 gradcam=False, extra_lines="\n" + lines)
    write_checkpoint(out_dir / "site.ckpt", checkpoint_with(read_checkpoint(ckpt), adapted, "site", record))
    log.info("evaluation folder: %s", out_dir)
    return metrics


def adaptation_method(cfg: DictConfig, net: Any, ckpt: str) -> str:
    """site.adapt, checked against the network; for site.choose with site.adapt=none, bn where the
    network has batch norm and normalization where it has none: a choice needs an adapted candidate."""
    from xray_cls.evaluation.site import batch_norm_layers

    method = cfg.site.adapt
    if method == "none" and cfg.site.choose:
        method = "bn" if batch_norm_layers(net) else "normalization"
        log.info("site.choose: the adapted candidates use site.adapt=%s", method)
    if method != "none":
        check_adaptable(net, method, f"ckpt={ckpt}", "site.adapt")
    return method


def site_parts(split: Any, fraction: float, seed: int, names: Sequence[str] = PNEUMONIA.classes
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(calibration indices, test indices, their sizes): the site's images split by patient."""
    from xray_cls.data import patient_split

    patients = site_patients(split)
    test, calibration = patient_split(split.labels.cpu(), patients, fraction, seed)

    def size(index: torch.Tensor) -> dict[str, Any]:
        return {"images": len(index), "patients": len({patients[i] for i in index.tolist()}),
                "per_class": dict(zip(names, torch.bincount(split.labels.cpu()[index], minlength=2).tolist()))}

    parts = {"calibration": size(calibration), "test": size(test), "fraction": fraction, "seed": seed}
    log.info("site: %s for calibration, %s for test", parts["calibration"], parts["test"])
    return calibration, test, parts


def site_candidates(cfg: DictConfig, method: str, module: Any, datamodule: Any, split: Any, calibration: torch.Tensor
                    ) -> tuple[dict[str, Candidate], dict[str, Any], dict[str, Any] | None]:
    """(the candidates to test: each name's model, choices, and the calibration part's logits and
    labels it was or would be recalibrated on; which images the adaptation read; the choice among
    all four with site.choose, else None and the one candidate site.adapt and site.recalibrate
    ask for). The labels read are the calibration part's: adaptation reads images alone."""
    adapt = method != "none"
    adapted, adaptation = module, {"part": "none", "images": 0}
    if adapt:
        index = calibration if cfg.site.adapt_on == "calibration" else torch.arange(len(split))
        adapted, seen = adapted_module(module, method, in_batches(split.gather(index).cpu()))
        adaptation = adaptation_record(cfg.site.adapt_on, index, calibration, split, seen)
        if method == "bn":
            adaptation["batch_norm"] = statistics_shift(module.net, adapted.net)
    wanted = CANDIDATES if cfg.site.choose else (candidate_name(adapt, bool(cfg.site.recalibrate)),)
    bases = {False: module, True: adapted}
    # The calibration part's logits before any temperature (choices leave them), of each model a candidate starts from.
    logits = {a: part_logits(bases[a], datamodule, split, calibration) for a in sorted({is_adapted(n) for n in wanted})}
    candidates: dict[str, Candidate] = {}
    for name in wanted:
        choices = module.choices
        if is_recalibrated(name):
            choices = recalibrated_choices(choices, *logits[is_adapted(name)], cfg.target_sensitivity,
                                           module.hparams.preprocessing["class_names"])
        model = copy.deepcopy(bases[is_adapted(name)])
        model.apply_choices(choices)
        candidates[name] = (model, choices, logits[is_adapted(name)])
    choice = None
    if cfg.site.choose:
        labels = logits[False][1]
        everyone = site_patients(split)
        patients = [everyone[i] for i in calibration.tolist()]

        def calls(name: str) -> torch.Tensor:
            scores = logits[is_adapted(name)][0]
            if is_recalibrated(name):
                return out_of_fold_calls(module.choices, scores, labels, patients, cfg.target_sensitivity, cfg.site.seed)
            return calls_at(module.choices, scores)

        choice = choose({name: calls(name) for name in CANDIDATES}, labels, module.choices.rule,
                        module.choices.target_sensitivity or cfg.target_sensitivity, cfg.bootstrap.resamples,
                        cfg.bootstrap.confidence, cfg.seed)
    return candidates, adaptation, choice


def is_adapted(name: str) -> bool:
    return name in ("adapted", "both")


def is_recalibrated(name: str) -> bool:
    return name in ("recalibrated", "both")


def site_patients(split: Any) -> list[str]:
    """Each image's patient, from its file name; one patient an image where the names tell none."""
    from xray_cls.data.patients import patient_groups

    return patient_groups(split.paths) if split.paths else [f"image:{i}" for i in range(len(split))]


def adaptation_record(adapt_on: str, index: torch.Tensor, calibration: torch.Tensor, split: Any, seen: int) -> dict[str, Any]:
    """Which of the site's images the adaptation read (their labels never): how many of each part, and a digest of their names."""
    in_calibration = int(torch.isin(index, calibration).sum())
    record = {"part": adapt_on, "images": seen, "calibration_part": in_calibration, "test_part": len(index) - in_calibration,
              "labels_read": False, "digest": files_digest(split.paths[i] for i in index.tolist()) if split.paths else None}
    log.info("site adaptation read %d images (site.adapt_on=%s: %d of the calibration part, %d of the test part), no labels",
             seen, adapt_on, record["calibration_part"], record["test_part"])
    return record


def statistics_shift(before: torch.nn.Module, after: torch.nn.Module) -> list[dict[str, Any]]:
    """Per batch-norm layer, how far the adaptation moved its statistics: the channels' mean
    |new mean - old mean| in old standard deviations, and the geometric mean of new variance / old."""
    old = dict(before.named_modules())
    shifts = []
    for name, layer in after.named_modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            source = old[name]
            sd = source.running_var.double().sqrt().clamp(min=1e-12)
            shifts.append({"layer": name, "channels": layer.num_features,
                           "mean_shift_sd": float(((layer.running_mean.double() - source.running_mean.double()).abs() / sd).mean()),
                           "variance_ratio": float((layer.running_var.double() / source.running_var.double().clamp(min=1e-12)).log().mean().exp())})
    return shifts


def part_logits(module: Any, datamodule: Any, split: Any, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from xray_cls.evaluation.logits import val_predictions

    return val_predictions(module, part(datamodule, split, index, module), "test")


def part(datamodule: Any, split: Any, index: torch.Tensor, module: Any) -> Any:
    """The datamodule serving only `index` of `split` as its test split, normalized as `module` normalizes."""
    served = copy.copy(datamodule)
    served.splits, served.test_split = {"test": split.subset(index.to(split.labels.device))}, "test"
    served.mean, served.std = module.hparams.preprocessing["mean"], module.hparams.preprocessing["std"]
    return served


def part_rows(split: Any, calibration: torch.Tensor, class_names: Sequence[str], adapted_on: str = "none") -> list[dict[str, Any]]:
    """site_parts.csv: each image's part, label, and whether the adaptation read it (`adapted_on`: none, calibration or all)."""
    in_calibration = set(calibration.tolist())
    names = [path_text(p) for p in split.paths] if split.paths else [f"images[{i}]" for i in range(len(split))]
    labels = split.labels.tolist()
    rows = []
    for i in range(len(split)):
        part_name = "calibration" if i in in_calibration else "test"
        read = adapted_on == "all" or (adapted_on == "calibration" and part_name == "calibration")
        rows.append({"path": names[i], "part": part_name, "label": class_names[labels[i]], "adapted_on": "yes" if read else "no"})
    return rows


def adaptation_line(method: str, adaptation: dict[str, Any]) -> str:
    if method == "none":
        return ""
    return (f"Adapted ({method}) on {adaptation['images']} site images, labels unread (site.adapt_on={adaptation['part']}: "
            f"{adaptation['calibration_part']} of the calibration part, {adaptation['test_part']} of the test part)\n")


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
