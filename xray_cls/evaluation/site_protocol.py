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
    check_patients_per_class,
    check_resamples,
    choice_lines,
    choose,
    is_adapted,
    is_recalibrated,
    out_of_fold_calls,
)
from xray_cls.metrics.val_choices import ValChoices

log = logging.getLogger(__name__)

Candidate = tuple[Any, ValChoices, tuple[torch.Tensor, torch.Tensor]]  # a model, its choices, the calibration logits and labels


COMPARED = ["accuracy", "precision", "recall", "specificity", "f1", "auroc"]
TESTED = ("n_test", "confusion_matrix", "test")  # what metrics.json keeps of each model tested on the test part


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
    patients = calibration_patients(split, calibration)
    if cfg.site.choose:
        check_resamples(cfg.bootstrap.resamples)
        check_patients_per_class(split.labels.cpu()[calibration], patients, names)
    method = adaptation_method(cfg, module.net, ckpt)
    candidates, adaptation = site_candidates(cfg, method, module, datamodule, split, calibration)
    choice = site_choice(cfg, module, candidates, patients) if cfg.site.choose else None
    chosen = choice["chosen"] if choice else next(iter(candidates))
    served = {name: part(datamodule, split, test, model) for name, (model, _, _) in candidates.items()}
    scored = {name: tested(trainer, model, served[name], choices, cfg) for name, (model, choices, _) in candidates.items()}
    applied, choices, calibration_logits = candidates[chosen]
    results, after = scored[chosen]
    before = scored["as_is"][1] if "as_is" in scored else tested(trainer, module, part(datamodule, split, test, module), module.choices, cfg)[1]
    record = applied_record(str(ckpt), chosen, method, adaptation, parts, split, calibration)
    site = {**record, "parts": parts, "before": {k: before[k] for k in ("threshold", "threshold_rule", *TESTED)},
            "operating_point": operating_point(choices, *calibration_logits, cfg.bootstrap.resamples, cfg.bootstrap.confidence,
                                               cfg.seed, names)}
    if choice:
        site["choice"] = {**choice, "adaptation": {"method": method, **adaptation}}
        site["candidates"] = {name: {k: m[k] for k in ("threshold", *TESTED)} for name, (_, m) in scored.items()}
    data = {k: v for k, v in cfg.data.items() if k in ("_target_", "path", "root")}
    metrics = {**after, "site": site, "evaluation": {"checkpoint": str(ckpt), "split": cfg.split, "data": data, "site_checkpoint": "site.ckpt",
                                                      "preprocessing": dict(applied.hparams.preprocessing)}}
    write_csv(out_dir / "site_parts.csv", part_rows(split, calibration, names, adaptation["part"]), ["path", "part", "label", "adapted_on"])
    lines = choice_lines(choice, {n: m for n, (_, m) in scored.items()}, COMPARED) if choice else side_by_side(before, after, parts)
    title = f"Site test part, {chosen.replace('_', ' ')}" + (" (chosen on the calibration part)" if choice else "")
    write_report(trainer, applied, served[chosen], results, metrics, cfg, out_dir, [TensorBoardLogger(save_dir=out_dir, name="", version="tensorboard")],
                 title, gradcam=False, extra_lines="\n" + adaptation_line(method, adaptation, bool(choice)) + lines)
    write_checkpoint(out_dir / "site.ckpt", checkpoint_with(read_checkpoint(ckpt), applied, "site", record))
    log.info("evaluation folder: %s", out_dir)
    return metrics


def applied_record(ckpt: str, chosen: str, method: str, adaptation: dict[str, Any], parts: dict[str, Any], split: Any,
                   calibration: torch.Tensor) -> dict[str, Any]:
    """The provenance of the model applied, for metrics.json and site.ckpt: its source, which
    candidate it is, its adaptation (none when it was not adapted) and the calibration images."""
    return {
        "source": ckpt, "applied": chosen, "adapt": method if is_adapted(chosen) else "none",
        "adapted_on": adaptation if is_adapted(chosen) else {"part": "none", "images": 0},
        "recalibrated": is_recalibrated(chosen), "calibration_images": parts["calibration"]["per_class"],
        "calibration_digest": files_digest(split.paths[i] for i in calibration.tolist()) if split.paths else None,
    }


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
                    ) -> tuple[dict[str, Candidate], dict[str, Any]]:
    """(the candidates to test: each name's model, its choices, and the calibration part's logits
    and labels of the model it starts from; which images the adaptation read). All four with
    site.choose, else the one site.adapt and site.recalibrate ask for. The labels read are the
    calibration part's: adaptation reads images alone."""
    from xray_cls.evaluation.site import statistics_shift

    adapted, adaptation = module, {"part": "none", "images": 0}
    if method != "none":
        index = calibration if cfg.site.adapt_on == "calibration" else torch.arange(len(split))
        images = split.gather(index) if cfg.site.adapt_on == "calibration" else split.images
        adapted, seen = adapted_module(module, method, in_batches(images.cpu()))
        adaptation = adaptation_record(cfg.site.adapt_on, index, calibration, split, seen)
        if method == "bn":
            adaptation["batch_norm"] = statistics_shift(module.net, adapted.net)
    if cfg.site.choose and cfg.site.recalibrate:
        log.info("site.choose: site.recalibrate=true is one of the candidates it weighs, not an order")
    wanted = CANDIDATES if cfg.site.choose else (candidate_name(method != "none", bool(cfg.site.recalibrate)),)
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
    return candidates, adaptation


def site_choice(cfg: DictConfig, module: Any, candidates: dict[str, Candidate], patients: list[str]) -> dict[str, Any]:
    """The choice among the four candidates (xray_cls.evaluation.site_choice), on the calibration
    part's calls and labels alone (`patients`: each calibration image's): the recalibrated ones out
    of fold, the others at the run's threshold."""
    names = module.hparams.preprocessing["class_names"]
    target = module.choices.target_sensitivity or cfg.target_sensitivity

    def calls(name: str) -> torch.Tensor:
        logits, labels = candidates[name][2]
        if is_recalibrated(name):
            return out_of_fold_calls(module.choices, logits, labels, patients, cfg.target_sensitivity, cfg.site.seed, names)
        return calls_at(module.choices, logits)

    labels = candidates["as_is"][2][1]
    return choose({name: calls(name) for name in CANDIDATES}, labels, patients, module.choices.rule, target,
                  cfg.bootstrap.resamples, cfg.bootstrap.confidence, cfg.seed)


def calibration_patients(split: Any, calibration: torch.Tensor) -> list[str]:
    everyone = site_patients(split)
    return [everyone[i] for i in calibration.tolist()]


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


def adaptation_line(method: str, adaptation: dict[str, Any], candidates: bool) -> str:
    if method == "none":
        return ""
    who = "The adapted candidates were adapted" if candidates else "Adapted"
    return (f"{who} ({method}) on {adaptation['images']} site images, labels unread (site.adapt_on={adaptation['part']}: "
            f"{adaptation['calibration_part']} of the calibration part, {adaptation['test_part']} of the test part)\n")


def side_by_side(before: dict[str, Any], after: dict[str, Any], parts: dict[str, Any]) -> str:
    """The test part's scores before and after, one line each, and the parts' sizes."""
    lines = [
        (f"Site test part before / after ({parts['test']['images']} images of {parts['test']['patients']} patients; "
         f"calibration part {parts['calibration']['images']} images of {parts['calibration']['patients']} patients, "
         f"{'/'.join(parts['calibration']['per_class'])} {'/'.join(map(str, parts['calibration']['per_class'].values()))}):"),
        f"  {'threshold':<22}{before['threshold']:.4f} / {after['threshold']:.4f}",
        *(f"  {name:<22}{before['test'][name]:.4f} / {after['test'][name]:.4f}" for name in COMPARED),
    ]
    return "\n".join(lines)
