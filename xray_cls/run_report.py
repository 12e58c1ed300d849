"""What a finished run leaves behind: metrics.json, figures and a console table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from xray_cls.val_choices import ValChoices

# TensorBoard "Custom Scalars" tab: train and val of one metric on one chart, like the study's curves.
CURVES_LAYOUT = {
    "curves": {
        "loss": ["Multiline", ["loss/train", "loss/val"]],
        "accuracy": ["Multiline", ["acc/train", "acc/val"]],
    }
}

ARGMAX = "the most probable class (argmax of the softmax)"  # how K >= 3 classes decide
MACRO = "precision, recall, specificity, F1 and AUROC (one vs rest) are means over the classes; accuracy is over the images"
TOP_CLASS = "the top-class probability, against whether that class is right"

SCORE_LABELS = {
    "accuracy": "accuracy",
    "precision": "precision",
    "recall": "recall (sensitivity)",
    "specificity": "specificity",
    "f1": "F1",
    "auroc": "AUROC",
}


def parameter_counts(net: nn.Module) -> dict[str, int]:
    params = list(net.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


def network_summary(net: nn.Module, input_shape: tuple[int, ...]) -> str:
    """A Keras-style table: each layer's output shape and parameter count, then the totals, from
    Lightning's ModelSummary (its forward hooks on every layer), one line per leaf layer."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    summary = ModelSummary(_Summarized(net, input_shape), max_depth=-1)
    names = summary.layer_names  # "net", "net.features", "net.features.0", ...
    leaves = [i for i, name in enumerate(names) if not any(other.startswith(name + ".") for other in names)]
    counts = parameter_counts(net)
    lines = [f"{type(net).__name__} on input {tuple(input_shape)}", f"  {'layer':<16}{'type':<12}{'output':<16}{'params':>10}"]
    for i in leaves:
        shape = str(tuple(summary.out_sizes[i][1:])) if isinstance(summary.out_sizes[i], list) else "?"
        lines.append(f"  {names[i].removeprefix('net.'):<16}{summary.layer_types[i]:<12}{shape:<16}{summary.param_nums[i]:>10,}")
    lines.append(f"  total params {counts['total']:,}, trainable {counts['trainable']:,}, non-trainable {counts['non_trainable']:,}")
    reported = getattr(net, "REPORTED", None)
    if reported:  # the course report's networks: their count depends on the image size and the head
        count, size, head = reported
        lines.append(f"  (the course report's count, {count:,}, is this network's at {size}x{size} px, one channel, head={head}; "
                     f"the flattened width, and so the count, grows with the image size)")
    return "\n".join(lines)


class _Summarized(L.LightningModule):
    """A network as ModelSummary takes one: a LightningModule with an example input."""

    def __init__(self, net: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.example_input_array = torch.zeros(1, *input_shape)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def class_names(module: Any) -> list[str]:
    """The classes a model tells apart, in label order, as its checkpoint's preprocessing records them."""
    return list(module.hparams.preprocessing["class_names"])


def evaluation_metrics(results: dict[str, Any], choices: ValChoices, resamples: int, confidence: float, seed: int,
                       names: list[str]) -> dict[str, Any]:
    """The test part of metrics.json (a run's and `evaluate`'s): matrix, scores and their intervals
    (none with resamples=0, as debug=fast sets)."""
    from xray_cls.config import check_number
    from xray_cls.metrics import bootstrap_intervals

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
        from xray_cls.metrics import per_class_scores

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
    from xray_cls.metrics import CALIBRATION_BINS, calibration_error, probabilities, reliability_bins

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


def draw_confusion_matrix(ax: Any, matrix: list[list[int]], class_names: list[str], fontsize: str = "medium") -> Any:
    """The counts as a heat map with each cell's number on it; returns the image for a colorbar."""
    counts = np.asarray(matrix)
    image = ax.imshow(counts, cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, fontsize=fontsize)
    ax.set_yticks(ticks, class_names, fontsize=fontsize)
    for (row, col), count in np.ndenumerate(counts):
        dark = count > counts.max() / 2
        ax.text(col, row, str(count), ha="center", va="center", color="white" if dark else "black")
    return image


def confusion_matrix_figure(matrix: list[list[int]], class_names: list[str]) -> Figure:
    from matplotlib.figure import Figure  # imported when a run ends, not at start-up

    fig = Figure(figsize=(4.2, 3.8), layout="constrained")
    ax = fig.add_subplot()
    fig.colorbar(draw_confusion_matrix(ax, matrix, class_names), ax=ax, shrink=0.8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test confusion matrix (n={np.asarray(matrix).sum()})")
    return fig


def curve_figure(x: torch.Tensor | list[torch.Tensor], y: torch.Tensor | list[torch.Tensor], xlabel: str, ylabel: str,
                 title: str, names: list[str] | None = None) -> Figure:
    """One curve; or, given lists and the class `names`, one curve per class (one vs the rest)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), layout="constrained")
    ax = fig.add_subplot()
    if isinstance(x, list):
        for xs, ys, name in zip(x, y, names or []):
            ax.plot(xs.numpy(), ys.numpy(), label=f"{name} vs rest")
        ax.legend(fontsize="small")
    else:
        ax.plot(x.numpy(), y.numpy())
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def reliability_figure(calibration: dict[str, Any], positive: str | None) -> Figure:
    """Fraction of positive (PNEUMONIA) images against the mean probability, per bin, for test (and
    val); K classes (`positive` None): the fraction called right against the top-class probability."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfectly calibrated")
    for name, bins in calibration["reliability"].items():
        points = [(m, f) for m, f in zip(bins["mean_probability"], bins["fraction_positive"]) if m is not None]
        ax.plot(*zip(*points), marker="o", label=f"{name} (ECE {calibration[f'{name}_ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"mean predicted probability of {positive}" if positive else "mean top-class probability")
    ax.set_ylabel(f"fraction {positive}" if positive else "fraction called right")
    temperature = calibration["temperature"]
    ax.set_title(f"reliability, {calibration['bins']} bins" + (f", temperature {temperature:.3f}" if temperature != 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    return fig


def make_test_figures(results: dict[str, Any], class_names: list[str]) -> dict[str, Figure]:
    fpr, tpr = results["roc"]
    precision, recall = results["pr_curve"]
    scores = results["scores"]
    macro = " macro" if len(class_names) > 2 else ""
    return {
        "confusion_matrix": confusion_matrix_figure(results["confusion_matrix"], class_names),
        "roc_curve": curve_figure(fpr, tpr, "false positive rate", "true positive rate", f"ROC (AUROC{macro} {scores['auroc']:.3f})",
                                  class_names),
        "pr_curve": curve_figure(recall, precision, "recall", "precision", "precision-recall", class_names),
    }


def save_figures(figures: dict[str, Figure], folder: Path) -> None:
    """Each figure as folder/<name>.png (the loggers get them through `xray_cls.loggers.log_figures`)."""
    from xray_cls.files import atomic_write

    for name, fig in figures.items():
        with atomic_write(folder / f"{name}.png") as tmp:  # a stopped run leaves whole figures or none
            fig.savefig(tmp, format="png", dpi=120)


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
    from xray_cls.files import write_json
    from xray_cls.gradcam import gradcam_sample_figure
    from xray_cls.loggers import log_figures, log_results

    figures = make_test_figures(results, metrics["class_names"])
    figures["reliability_diagram"] = reliability_figure(metrics["calibration"], metrics.get("positive_class"))
    if gradcam and cfg.gradcam_samples > 0:
        figures.update(gradcam_sample_figure(module, datamodule, cfg.gradcam_samples, cfg.seed))
    save_figures(figures, out_dir / "figures")
    log_figures(loggers, figures, trainer.global_step)
    log_results(loggers, metrics)
    write_json(out_dir / "metrics.json", metrics)
    print(format_test_table(metrics, title) + extra_lines, flush=True)
