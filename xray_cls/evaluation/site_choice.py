"""`site.choose=true`: which of as it is, adapted, recalibrated and both a site gets, decided on
the labels of its calibration part alone.

Each candidate's calls on the calibration images are scored by the objective of the run's own
threshold rule (youden: sensitivity + specificity - 1). A recalibrated candidate's threshold is
chosen on those same labels, so it would win by fitting them; its calls are made out of fold
instead: each of FOLDS patient folds is called at the threshold recalibrated on the other folds.
A candidate replaces as-it-is only when the paired bootstrap interval of its score minus as-it-is's
lies above zero: on a hundred-odd images a smaller difference is noise, and the protocol is to be
never worse than doing nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from xray_cls.core.errors import UserInputError
from xray_cls.metrics.val_choices import ValChoices

CANDIDATES = ("as_is", "adapted", "recalibrated", "both")  # (adapted, recalibrated) of each, in this order
FOLDS = 5  # out-of-fold recalibration: each threshold is fitted on 4/5 of the calibration part
MIN_RESAMPLES = 100  # fewer, and the 2.5% tail of an interval rests on two or three resamples


def candidate_name(adapted: bool, recalibrated: bool) -> str:
    return CANDIDATES[2 * recalibrated + adapted]


def rule_objective(rule: str) -> str:
    return {"youden": "youden_j", "youden_neutral": "youden_j", "sensitivity": "specificity_at_target"}.get(rule, "accuracy")


def rule_scores(rule: str, called: Tensor, labels: Tensor, target_sensitivity: float) -> Tensor:
    """The rule's objective for each row of calls (R, N) against labels (R, N): Youden's J for the
    youden rules; for `sensitivity`, the specificity where the target is met, and below any such
    (sensitivity - target - 1 < -1) where it is not; accuracy for a fixed threshold."""
    positive = labels.bool()
    sensitivity = (called & positive).sum(1) / positive.sum(1).clamp(min=1)
    specificity = (~called & ~positive).sum(1) / (~positive).sum(1).clamp(min=1)
    objective = rule_objective(rule)
    if objective == "youden_j":
        return sensitivity + specificity - 1
    if objective == "specificity_at_target":
        return torch.where(sensitivity >= target_sensitivity, specificity, sensitivity - target_sensitivity - 1)
    return (called == positive).double().mean(1)


def calls_at(choices: ValChoices, logits: Tensor) -> Tensor:
    return torch.sigmoid(logits.double() / choices.temperature) > choices.threshold


def out_of_fold_calls(choices: ValChoices, logits: Tensor, labels: Tensor, patients: Sequence[str], target_sensitivity: float,
                      seed: int) -> Tensor:
    """Each calibration image called at the threshold (and temperature) recalibrated, by the run's
    rule, on the patient folds it is not in."""
    from xray_cls.data.patients import patient_folds
    from xray_cls.evaluation.site import recalibrated_choices

    fold_of = torch.tensor(patient_folds(labels, list(patients), FOLDS, seed))
    calls = torch.zeros(len(labels), dtype=torch.bool)
    # Each fold's threshold and small-class warning would be a line saying nothing the choice does not.
    quiet = [logging.getLogger(name) for name in ("xray_cls.metrics.val_choices", "xray_cls.evaluation.site")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        for fold in fold_of.unique().tolist():
            held = fold_of == fold
            fitted = recalibrated_choices(choices, logits[~held], labels[~held], target_sensitivity)
            calls[held] = calls_at(fitted, logits[held])
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return calls


def check_resamples(resamples: int) -> None:
    if resamples < MIN_RESAMPLES:
        raise UserInputError(f"site.choose=true weighs each candidate by its bootstrap interval, and bootstrap.resamples={resamples} "
                             f"gives none; expected bootstrap.resamples >= {MIN_RESAMPLES}")


def choose(calls: Mapping[str, Tensor], labels: Tensor, rule: str, target_sensitivity: float, resamples: int, confidence: float,
           seed: int) -> dict[str, Any]:
    """The candidate to apply, and every candidate's score on the calibration part, its difference
    from as-it-is and that difference's paired percentile bootstrap interval (the same resamples
    for every candidate)."""
    names = list(calls)
    stacked = torch.stack([calls[name] for name in names])  # (candidates, N)
    point = rule_scores(rule, stacked, labels.expand_as(stacked), target_sensitivity)
    index = torch.randint(len(labels), (resamples, len(labels)), generator=torch.Generator().manual_seed(seed))
    resampled = torch.stack([rule_scores(rule, row[index], labels[index], target_sensitivity) for row in stacked])  # (candidates, R)
    tail = (1 - confidence) / 2
    levels = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    scored = {}
    for i, name in enumerate(names):
        difference = resampled[i].double() - resampled[0].double()
        scored[name] = {"score": float(point[i]), "difference": float(point[i] - point[0]),
                        "ci": torch.quantile(difference, levels).tolist()}
    better = [name for name in names[1:] if scored[name]["ci"][0] > 0]
    chosen = max(better, key=lambda name: scored[name]["score"]) if better else names[0]
    return {"chosen": chosen, "rule": rule, "objective": rule_objective(rule), "images": len(labels), "folds": FOLDS,
            "resamples": resamples, "confidence": confidence, "candidates": scored}


def choice_lines(choice: dict[str, Any], tested: Mapping[str, Mapping[str, Any]], compared: Sequence[str]) -> str:
    """The console's account of a choice: each candidate's calibration score and the test part's scores."""
    names = list(tested)
    lines = [
        (f"Site choice on the calibration part ({choice['images']} images, {choice['objective']} of the {choice['rule']} rule, "
         f"recalibrated candidates out of {choice['folds']} folds; chosen where the {choice['confidence']:.0%} interval "
         f"of the difference from as_is lies above 0): {choice['chosen']}"),
        f"  {'':<24}" + "".join(f"{name + (' *' if name == choice['chosen'] else ''):>18}" for name in names),
        f"  {'calibration score':<24}" + "".join(f"{choice['candidates'][n]['score']:>18.4f}" for n in names),
        f"  {'  minus as_is, interval':<24}" + "".join(
            f"{'[{:+.3f}, {:+.3f}]'.format(*choice['candidates'][n]['ci']) if n != names[0] else '':>18}" for n in names),
        f"  {'test part threshold':<24}" + "".join(f"{tested[n]['threshold']:>18.4f}" for n in names),
        *(f"  {'test part ' + key:<24}" + "".join(f"{tested[n]['test'][key]:>18.4f}" for n in names) for key in compared),
    ]
    return "\n".join(lines)
