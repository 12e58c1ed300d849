"""`site.choose=true`: which of as it is, adapted, recalibrated and both a site gets, decided on
the labels of its calibration part alone.

Each candidate's calls on the calibration images are scored by the objective of the run's own
threshold rule (youden: sensitivity + specificity - 1). A recalibrated candidate's threshold is
chosen on those same labels, so it would win by fitting them; its calls are made out of fold
instead: each of FOLDS patient folds is called at the threshold recalibrated on the other folds.
A candidate replaces as-it-is only when the paired bootstrap interval (patients resampled) of its
score minus as-it-is's lies above zero: on a hundred-odd images a smaller difference is noise, and
the protocol is to be never worse than doing nothing. The interval holds each call fixed, so it
leaves out how much a refitted threshold would move: it is a floor on the noise, not its whole.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from xray_cls.core.errors import UserInputError
from xray_cls.core.task import PNEUMONIA
from xray_cls.metrics.val_choices import ValChoices

CANDIDATES = ("as_is", "adapted", "recalibrated", "both")  # (adapted, recalibrated) of each, in this order
FOLDS = 5  # out-of-fold recalibration: each threshold is fitted on 4/5 of the calibration part
MIN_RESAMPLES = 100  # fewer, and the 2.5% tail of an interval rests on two or three resamples


def candidate_name(adapted: bool, recalibrated: bool) -> str:
    return CANDIDATES[2 * recalibrated + adapted]


def is_adapted(name: str) -> bool:
    return name in ("adapted", "both")


def is_recalibrated(name: str) -> bool:
    return name in ("recalibrated", "both")


def rule_objective(rule: str) -> str:
    return {"youden": "youden_j", "youden_neutral": "youden_j", "sensitivity": "specificity_at_target"}.get(rule, "accuracy")


def rule_scores(rule: str, counts: Tensor, target_sensitivity: float) -> Tensor:
    """The rule's objective from confusion counts (..., 4: TP, FN, TN, FP): Youden's J for the
    youden rules; for `sensitivity`, the specificity where the target is met, and below any such
    (sensitivity - target - 1 < -1) where it is not; accuracy for a fixed threshold."""
    tp, fn, tn, fp = counts.double().unbind(-1)
    sensitivity = tp / (tp + fn).clamp(min=1)
    specificity = tn / (tn + fp).clamp(min=1)
    objective = rule_objective(rule)
    if objective == "youden_j":
        return sensitivity + specificity - 1
    if objective == "specificity_at_target":
        return torch.where(sensitivity >= target_sensitivity, specificity, sensitivity - target_sensitivity - 1)
    return (tp + tn) / counts.sum(-1).clamp(min=1)


def confusion_counts(called: Tensor, labels: Tensor) -> Tensor:
    """(N, 4) one-hot TP, FN, TN, FP of each call."""
    positive = labels.bool()
    return torch.stack([called & positive, ~called & positive, ~called & ~positive, called & ~positive], -1).long()


def calls_at(choices: ValChoices, logits: Tensor) -> Tensor:
    return torch.sigmoid(logits.double() / choices.temperature) > choices.threshold


def check_patients_per_class(labels: Tensor, patients: Sequence[str], names: Sequence[str]) -> None:
    """Out-of-fold recalibration leaves a patient's fold out: a class of one patient would be missing from it."""
    from xray_cls.data.patients import patient_classes

    classes = list(patient_classes(labels, list(patients))[1].values())
    for label, name in enumerate(names):
        if classes.count(label) < 2:
            raise UserInputError(
                f"site.choose=true scores recalibration out of {FOLDS} patient folds, and the calibration part holds "
                f"{classes.count(label)} patient(s) of {name}; expected at least 2 of each class (a larger site.calibration_fraction)")


@contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Warnings and info of these loggers held back: each fold's threshold would be a line saying nothing the choice does not."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def out_of_fold_calls(choices: ValChoices, logits: Tensor, labels: Tensor, patients: Sequence[str], target_sensitivity: float,
                      seed: int, names: Sequence[str] = PNEUMONIA.classes) -> Tensor:
    """Each calibration image called at the threshold (and temperature) recalibrated, by the run's
    rule, on the patient folds it is not in."""
    from xray_cls.data.patients import patient_folds
    from xray_cls.evaluation.site import recalibrated_choices

    check_patients_per_class(labels, patients, names)
    fold_of = torch.tensor(patient_folds(labels, list(patients), FOLDS, seed))
    calls = torch.zeros(len(labels), dtype=torch.bool)
    with quiet("xray_cls.metrics.val_choices", "xray_cls.evaluation.site"):
        for fold in fold_of.unique().tolist():
            held = fold_of == fold
            fitted = recalibrated_choices(choices, logits[~held], labels[~held], target_sensitivity, names)
            calls[held] = calls_at(fitted, logits[held])
    return calls


def check_resamples(resamples: int) -> None:
    if resamples < MIN_RESAMPLES:
        raise UserInputError(f"site.choose=true weighs each candidate by its bootstrap interval, and bootstrap.resamples={resamples} "
                             f"is too few for one; expected bootstrap.resamples >= {MIN_RESAMPLES}")


def choose(calls: Mapping[str, Tensor], labels: Tensor, patients: Sequence[str], rule: str, target_sensitivity: float,
           resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    """The candidate to apply, and every candidate's score on the calibration part, its difference
    from as-it-is (the first) and that difference's paired percentile bootstrap interval: the same
    resampled patients, with all their images, for every candidate."""
    names = list(calls)
    groups = {patient: i for i, patient in enumerate(dict.fromkeys(patients))}
    group_of = torch.tensor([groups[p] for p in patients])
    per_patient = torch.stack([torch.zeros(len(groups), 4, dtype=torch.long).index_add_(0, group_of, confusion_counts(calls[n], labels))
                               for n in names])  # (candidates, patients, 4)
    point = rule_scores(rule, per_patient.sum(1), target_sensitivity)
    index = torch.randint(len(groups), (resamples, len(groups)), generator=torch.Generator().manual_seed(seed))
    resampled = rule_scores(rule, per_patient[:, index].sum(2), target_sensitivity)  # (candidates, resamples)
    tail = (1 - confidence) / 2
    levels = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    scored = {name: {"score": float(point[i]), "difference": float(point[i] - point[0]),
                     "ci": torch.quantile(resampled[i] - resampled[0], levels).tolist()} for i, name in enumerate(names)}
    better = [name for name in names[1:] if scored[name]["ci"][0] > 0]
    chosen = max(better, key=lambda name: scored[name]["score"]) if better else names[0]
    return {"chosen": chosen, "rule": rule, "objective": rule_objective(rule), "images": len(labels), "patients": len(groups),
            "folds": FOLDS, "resamples": resamples, "confidence": confidence, "candidates": scored}


def choice_lines(choice: dict[str, Any], tested: Mapping[str, Mapping[str, Any]], compared: Sequence[str]) -> str:
    """The console's account of a choice: each candidate's calibration score and the test part's scores."""
    names = list(tested)

    def row(label: str, cells: Sequence[str]) -> str:
        return f"  {label:<24}" + "".join(f"{cell:>18}" for cell in cells)

    intervals = ["" if n == names[0] else "[{:+.3f}, {:+.3f}]".format(*choice["candidates"][n]["ci"]) for n in names]
    lines = [
        (f"Site choice on the calibration part ({choice['images']} images, {choice['objective']} of the {choice['rule']} rule, "
         f"recalibrated candidates out of {choice['folds']} folds; chosen where the {choice['confidence']:.0%} interval "
         f"of the difference from as_is lies above 0): {choice['chosen']}"),
        row("", [name + (" *" if name == choice["chosen"] else "") for name in names]),
        row("calibration score", [f"{choice['candidates'][n]['score']:.4f}" for n in names]),
        row("  minus as_is, interval", intervals),
        row("test part threshold", [f"{tested[n]['threshold']:.4f}" for n in names]),
        *(row(f"test part {key}", [f"{tested[n]['test'][key]:.4f}" for n in names]) for key in compared),
    ]
    return "\n".join(lines)
