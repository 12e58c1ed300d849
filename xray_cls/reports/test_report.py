"""What a finished run leaves behind: metrics.json, figures and a console table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from xray_cls.reports.figures import make_test_figures, reliability_figure, save_figures
from xray_cls.reports.tables import format_test_table

if TYPE_CHECKING:
    from xray_cls.metrics.val_choices import ValChoices


ARGMAX = "the most probable class (argmax of the softmax)"  # how K >= 3 classes decide
MACRO = "precision, recall, specificity, F1 and AUROC (one vs rest) are means over the classes; accuracy is over the images"
TOP_CLASS = "the top-class probability, against whether that class is right"


def class_names(module: Any) -> list[str]:
    """The classes a model tells apart, in label order, as its checkpoint's preprocessing records them."""
    return list(module.hparams.preprocessing["class_names"])


def evaluation_metrics(results: dict[str, Any], choices: ValChoices, resamples: int, confidence: float, seed: int,
                       names: list[str]) -> dict[str, Any]:
    """The test part of metrics.json (a run's and `evaluate`'s): matrix, scores and their intervals
    (none with resamples=0, as debug=fast sets)."""
    from xray_cls.core.options import check_number
    from xray_cls.metrics.bootstrap import bootstrap_intervals

    check_number("bootstrap.resamples", resamples, 0, integer=True, expected="0 (no intervals) or a positive integer")
    matrix = results["confusion_matrix"]
    if len(names) == 2:
        decision = {"positive_class": names[-1], "threshold": choices.threshold, "threshold_rule": choices.rule_record()}
        cells = confusion_cells(matrix)
    else:
        decision, cells = {"decision": ARGMAX}, {}
    metrics = {
        "class_names": names,
        **decision,
        "n_test": sum(map(sum, matrix)),
        "confusion_matrix": {"rows": "true class", "columns": "predicted class", "matrix": matrix, **cells},
        "test": results["scores"],
    }
    if len(names) > 2:
        from xray_cls.metrics.per_class import per_class_scores

        metrics["averaging"] = MACRO
        metrics["per_class"] = per_class_scores(matrix, results["probs"], results["labels"], names)
    if resamples:
        intervals = bootstrap_intervals(results["probs"], results["labels"], choices.threshold, resamples, confidence, seed)
        metrics["test_ci"] = {"confidence": confidence, "resamples": resamples, **intervals}
    return metrics


def calibration_metrics(results: dict[str, Any], temperature: float, val: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
    """metrics.json's `calibration`: the temperature, the ECE of the probabilities as reported (and
    before temperature scaling, when there is one) on test and, for a run, on val; and the bins of
    each reliability diagram. K classes: of the top-class probability."""
    from xray_cls.metrics.calibration import CALIBRATION_BINS, calibration_error, probabilities, reliability_bins

    splits = {"test": (results["logits"], results["labels"])}
    if val is not None:
        splits["val"] = val
    section: dict[str, Any] = {"bins": CALIBRATION_BINS, "temperature": temperature}
    if results["logits"].dim() == 2:
        section["of"] = TOP_CLASS
    reliability = {}
    for name, (logits, labels) in splits.items():
        probs = probabilities(logits.double(), temperature)
        section[f"{name}_ece"] = calibration_error(probs, labels)
        if temperature != 1.0:
            section[f"{name}_ece_uncalibrated"] = calibration_error(probabilities(logits.double()), labels)
        reliability[name] = reliability_bins(probs, labels)
    section["reliability"] = reliability
    return section


def confusion_cells(matrix: list[list[int]]) -> dict[str, int]:
    (tn, fp), (fn, tp) = matrix
    return {"tn": tn, "fp": fp, "fn": fn, "tp": tp}


def test_and_report(
    trainer: Any,
    module: Any,
    datamodule: Any,
    choices: ValChoices,
    cfg: Any,
    out_dir: Path,
    extra: dict[str, Any],
    loggers: list[Any],
    title: str = "Test results",
    gradcam: bool = True,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Test `module` on the datamodule's test split and leave what a run and `evaluate` leave: the
    figures (PNG and every logger), metrics.json (the test part, calibration, then `extra`) and the
    console table. `val`: a run's val logits and labels, for their ECE and reliability diagram.
    Every process tests (the metrics are reduced across them); the first one writes."""
    results, metrics = tested(trainer, module, datamodule, choices, cfg, val)
    metrics = {**metrics, **extra}
    if trainer.is_global_zero:
        write_report(trainer, module, datamodule, results, metrics, cfg, out_dir, loggers, title, gradcam)
    return metrics


def tested(trainer: Any, module: Any, datamodule: Any, choices: ValChoices, cfg: Any,
           val: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the test results, metrics.json's test part and calibration) of `module` on the datamodule's test split."""
    trainer.test(module, datamodule=datamodule, verbose=False)
    results = module.test_results
    metrics = evaluation_metrics(results, choices, cfg.bootstrap.resamples, cfg.bootstrap.confidence, cfg.seed, class_names(module))
    return results, {**metrics, "calibration": calibration_metrics(results, module.temperature, val)}


def write_report(trainer: Any, module: Any, datamodule: Any, results: dict[str, Any], metrics: dict[str, Any], cfg: Any,
                 out_dir: Path, loggers: list[Any], title: str, gradcam: bool, extra_lines: str = "") -> None:
    """The figures (PNG and every logger), metrics.json and the console table (then `extra_lines`)."""
    from xray_cls.core.files import write_json
    from xray_cls.reports.gradcam import gradcam_sample_figure
    from xray_cls.training.loggers import log_figures, log_results

    figures = make_test_figures(results, metrics["class_names"])
    figures["reliability_diagram"] = reliability_figure(metrics["calibration"], metrics.get("positive_class"))
    if gradcam and cfg.gradcam_samples > 0:
        figures.update(gradcam_sample_figure(module, datamodule, cfg.gradcam_samples, cfg.seed))
    save_figures(figures, out_dir / "figures")
    log_figures(loggers, figures, trainer.global_step)
    log_results(loggers, metrics)
    write_json(out_dir / "metrics.json", metrics)
    print(format_test_table(metrics, title) + extra_lines, flush=True)
