"""The console table of a test: scores with their intervals, calibration, the confusion matrix."""

from __future__ import annotations

from typing import Any

SCORE_LABELS = {
    "accuracy": "accuracy",
    "precision": "precision",
    "recall": "recall (sensitivity)",
    "specificity": "specificity",
    "f1": "F1",
    "auroc": "AUROC",
}


def format_test_table(metrics: dict[str, Any], title: str = "Test results") -> str:
    if len(metrics["class_names"]) > 2:
        return format_multiclass_table(metrics, title)
    names = metrics["class_names"]
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]["matrix"]
    width = max(len(n) for n in names) + 2
    lines = [
        f"{title}: {metrics['n_test']} images, positive class {metrics['positive_class']}, "
        f"threshold {metrics['threshold']:.4f} ({_rule_text(metrics)})",
        *(f"  {label:<22}{metrics['test'][key]:.4f}{_interval(metrics, key)}" for key, label in SCORE_LABELS.items()),
        *_calibration_lines(metrics),
        "  confusion matrix (rows true, columns predicted):",
        f"  {'':<{width}}{names[0]:>{width}}{names[1]:>{width}}",
        f"  {names[0]:<{width}}{tn:>{width}}{fp:>{width}}",
        f"  {names[1]:<{width}}{fn:>{width}}{tp:>{width}}",
    ]
    return "\n".join(lines)


def format_multiclass_table(metrics: dict[str, Any], title: str) -> str:
    """The K-class table: accuracy and the macro scores, each class's scores, the K x K matrix."""
    names = metrics["class_names"]
    width = max(8, *(len(n) for n in names)) + 2
    per_class = metrics["per_class"]
    lines = [
        f"{title}: {metrics['n_test']} images, {len(names)} classes, each image called its most probable class",
        *(f"  {label + ('' if key == 'accuracy' else ' (macro)'):<30}{metrics['test'][key]:.4f}{_interval(metrics, key)}"
          for key, label in SCORE_LABELS.items()),
        *_calibration_lines(metrics, 30),
        f"  {'class':<{width}}{'precision':>10}{'recall':>10}{'F1':>10}{'AUROC':>10}{'images':>8}",
        *(f"  {n:<{width}}{s['precision']:>10.4f}{s['recall']:>10.4f}{s['f1']:>10.4f}"
          f"{'' if s['auroc'] is None else format(s['auroc'], '.4f'):>10}{s['support']:>8}" for n, s in per_class.items()),
        "  confusion matrix (rows true, columns predicted):",
        f"  {'':<{width}}" + "".join(f"{n:>{width}}" for n in names),
        *(f"  {n:<{width}}" + "".join(f"{c:>{width}}" for c in row) for n, row in zip(names, metrics["confusion_matrix"]["matrix"])),
    ]
    return "\n".join(lines)


def _rule_text(metrics: dict[str, Any]) -> str:
    rule = metrics["threshold_rule"]
    if rule["rule"] == "fixed":
        return "fixed"
    return (
        f"{rule['rule']} rule on val: val sensitivity {rule['val_sensitivity']:.4f}, "
        f"specificity {rule['val_specificity']:.4f}"
    )


def _calibration_lines(metrics: dict[str, Any], width: int = 22) -> list[str]:
    calibration = metrics.get("calibration")
    if not calibration:
        return []
    line = f"  {'ECE (' + str(calibration['bins']) + ' bins)':<{width}}{calibration['test_ece']:.4f}"
    if "test_ece_uncalibrated" in calibration:
        line += f"  (temperature {calibration['temperature']:.4f}; {calibration['test_ece_uncalibrated']:.4f} before)"
    return [line]


def _interval(metrics: dict[str, Any], key: str) -> str:
    ci = metrics.get("test_ci", {})
    if key not in ci:
        return ""
    low, high = ci[key]
    return f"  ({100 * ci['confidence']:.0f}% CI {low:.4f}-{high:.4f})"
