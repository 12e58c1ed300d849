"""What a run chooses on its val split once training is done, as one value (`ValChoices`).

After fit, the tested weights' val logits give the temperature (`calibration=temperature`:
temperature scaling, Guo et al. 2017) and then, on the calibrated val probabilities, the decision
threshold by `threshold_rule`. Test, `evaluate`, `predict`, `export` and an ensemble's threshold
all use the same value: it is written into a run's checkpoints and read back from them here, in
the format checkpoints have always had (`threshold`, `threshold_rule`, `temperature`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from xray_cls.core.errors import UserInputError
from xray_cls.metrics.options import CALIBRATIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValChoices:
    """An image is called PNEUMONIA when sigmoid(logit / temperature) > threshold; `rule` says how
    the threshold was chosen, with the val sensitivity and specificity at it (None when it was
    given, not chosen on val). K >= 3 classes use the temperature alone (softmax(logits / temperature))."""

    threshold: float = 0.5
    rule: str = "fixed"
    val_sensitivity: float | None = None
    val_specificity: float | None = None
    temperature: float = 1.0
    calibration: str = "none"  # how the temperature was found: none (1) or temperature scaling
    target_sensitivity: float | None = None  # the `sensitivity` rule's target

    def rule_record(self) -> dict[str, Any]:
        """metrics.json's and the checkpoint's `threshold_rule`."""
        record: dict[str, Any] = {"rule": self.rule, "threshold": self.threshold}
        if self.val_sensitivity is not None:
            record.update(val_sensitivity=self.val_sensitivity, val_specificity=self.val_specificity)
        if self.target_sensitivity is not None:
            record["target_sensitivity"] = self.target_sensitivity
        return record

    def with_threshold(self, threshold: float) -> ValChoices:
        """The same temperature, with a threshold given by the user rather than chosen on val."""
        return replace(self, threshold=float(threshold), rule="fixed", val_sensitivity=None, val_specificity=None)

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> ValChoices:
        """A checkpoint's choices (checked plain values, see checkpoint.untrusted_part). A checkpoint
        written before the rule was recorded has only its threshold: a fixed one."""
        rule = hparams.get("threshold_rule") or {}
        temperature = float(hparams.get("temperature", 1.0))
        return cls(
            threshold=float(hparams.get("threshold", 0.5)),
            rule=str(rule.get("rule", "fixed")),
            val_sensitivity=rule.get("val_sensitivity"),
            val_specificity=rule.get("val_specificity"),
            temperature=temperature,
            # written before the method was recorded: a temperature other than 1 was fitted
            calibration=str(hparams.get("calibration") or ("temperature" if temperature != 1.0 else "none")),
            target_sensitivity=rule.get("target_sensitivity"),
        )

    def record_in(self, path: Path, checkpoint: dict[str, Any]) -> None:
        """Write the choices into `checkpoint` (as read from `path`) and the file, durably."""
        from xray_cls.core.checkpoint_files import write_checkpoint

        checkpoint["hyper_parameters"].update(self.hparams())
        write_checkpoint(path, checkpoint)

    def hparams(self) -> dict[str, Any]:
        """The checkpoint's (and the classifier's) hyper-parameters that hold these choices."""
        return {"threshold": self.threshold, "threshold_rule": self.rule_record(), "temperature": float(self.temperature),
                "calibration": self.calibration}




def choose_on_val(
    logits: torch.Tensor, labels: torch.Tensor, calibration: str, rule: str, fixed: float, target_sensitivity: float,
    on: str = "val",
) -> ValChoices:
    """The temperature by `calibration`, then the threshold by `rule` on the calibrated val probabilities
    (`on` names the images in the log: another site's calibration part is no val split)."""
    from xray_cls.metrics.calibration import probabilities

    temperature = fit_calibration(calibration, logits, labels, on)
    if logits.dim() == 2:  # K classes: the most probable class, no threshold to choose
        check_rule_applies(rule, logits.shape[1])
        return ValChoices(threshold=fixed, temperature=temperature, calibration=calibration)
    chosen = choose_threshold_on_val(probabilities(logits, temperature), labels, rule, fixed, target_sensitivity,
                                     temperature, on)
    return replace(chosen, calibration=calibration)


def check_rule_applies(rule: str, num_classes: int, option: str = "threshold_rule") -> None:
    """Threshold rules choose a threshold on one probability; K >= 3 classes call the most probable class."""
    if num_classes > 2 and rule != "fixed":
        raise UserInputError(
            f"{option}={rule} chooses a threshold for two classes; this task has {num_classes}, and each image is called "
            "its most probable class; expected threshold_rule=fixed"
        )


def choose_threshold_on_val(
    probs: torch.Tensor, labels: torch.Tensor, rule: str, fixed: float, target_sensitivity: float, temperature: float = 1.0,
    on: str = "val",
) -> ValChoices:
    from xray_cls.metrics.thresholds import choose_threshold

    chosen = choose_threshold(rule, probs, labels, fixed, target_sensitivity)
    log.info(
        "threshold %.4f (%s rule on %d %s images): sensitivity %.4f, specificity %.4f there",
        chosen["threshold"], chosen["rule"], len(labels), on, chosen["val_sensitivity"], chosen["val_specificity"],
    )
    target = target_sensitivity if rule == "sensitivity" else None
    return ValChoices(chosen["threshold"], chosen["rule"], chosen["val_sensitivity"], chosen["val_specificity"], temperature,
                      target_sensitivity=target)


def fit_calibration(calibration: str, val_logits: torch.Tensor, val_labels: torch.Tensor, on: str = "val") -> float:
    """The temperature by `calibration`: 1 (none), or temperature scaling fitted on val only."""
    from xray_cls.core.options import check_choice
    from xray_cls.metrics.calibration import TEMPERATURE_RANGE, calibration_error, fit_temperature, probabilities

    if check_choice("calibration", calibration, CALIBRATIONS, "known") == "none":
        return 1.0
    temperature = fit_temperature(val_logits, val_labels)
    if temperature in TEMPERATURE_RANGE:
        log.warning("the temperature fitted on %s reached the limit %s: %s may be too small or too easy", on, temperature, on)
    before = calibration_error(probabilities(val_logits), val_labels)
    after = calibration_error(probabilities(val_logits, temperature), val_labels)
    log.info("temperature %.4f fitted on %s: ECE there %.4f before, %.4f after", temperature, on, before, after)
    return temperature
