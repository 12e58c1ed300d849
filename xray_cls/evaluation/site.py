"""A trained model at another site: adapted to the site's images without their labels, recalibrated
on a few labeled ones, and the protocol that measures both on images kept apart.

- **Adaptation** (`adapt`): `bn` re-estimates every batch-norm layer's running statistics on the
  site's images (AdaBN, Li et al. 2016): the network runs in eval mode, no weight changes, and each
  batch-norm layer takes the exact statistics of what reaches it from the site's images. `normalization` takes the site's
  own pixel mean and standard deviation instead of the train split's, for any network.
- **Recalibration** (`recalibrate`): the temperature (when the run fitted one) and the threshold
  are chosen again, by the checkpoint's own rule, on the site's labeled images.
- **Provenance**: a checkpoint written by either records its source checkpoint, the number of
  images, and a digest of their file list.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xray_cls.core.errors import UserInputError
from xray_cls.core.files import path_text
from xray_cls.core.task import PNEUMONIA
from xray_cls.metrics.val_choices import ValChoices, choose_on_val

log = logging.getLogger(__name__)


MIN_IMAGES_PER_CLASS = 30  # fewer, and a recalibration's threshold and its intervals are rough
ADAPT_BATCH = 256  # images per forward pass while the statistics are gathered


def batch_norm_layers(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def check_adaptable(net: nn.Module, method: str, source: str, option: str = "method") -> None:
    """`bn` needs batch norm: refused for a network without it, naming the method that works
    (`option` is the command's name for the method: method, or evaluate's site.adapt)."""
    if method == "bn" and not batch_norm_layers(net):
        raise UserInputError(
            f"{source}: its {type(net).__name__} has no batch-norm layers, so {option}=bn cannot adapt it; "
            f"expected a network with batch norm (model=resnet), or {option}=normalization, which works for any network"
        )


def adapt_batch_norm(net: nn.Module, batches: Sequence[Tensor]) -> int:
    """AdaBN on `net` in place: each batch-norm layer's running mean and variance become the exact
    statistics, over all of `batches` (preprocessed images), of what reaches it once the layers
    before it are adapted. Layer by layer in the order the forward pass meets them, the network in
    eval mode and no weight changed. Exact, not an average of batch statistics: a folder read class
    by class gives batches of one class, whose variances miss the difference between the classes.
    Returns the number of images."""
    net.eval()
    with torch.no_grad():
        for layer in forward_order(net, batch_norm_layers(net), batches[0]):
            mean, var = input_statistics(net, layer, batches)
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
    return sum(len(images) for images in batches)


class _Seen(Exception):
    """Stops a forward pass once the layer being measured has seen its input."""


def forward_order(net: nn.Module, layers: list[nn.Module], images: Tensor) -> list[nn.Module]:
    order: list[nn.Module] = []
    hooks = [layer.register_forward_pre_hook(lambda module, _: order.append(module) if module not in order else None)
             for layer in layers]
    try:
        net(images)
    finally:
        for hook in hooks:
            hook.remove()
    return order


def input_statistics(net: nn.Module, layer: nn.Module, batches: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The per-channel mean and unbiased variance of `layer`'s input over all `batches`, in float64;
    each forward pass stops at the layer."""
    sums: list[Tensor] = []

    def measure(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].double().transpose(0, 1).reshape(inputs[0].shape[1], -1)  # channels first
        sums.append(torch.stack([torch.full_like(x[:, 0], x.shape[1]), x.sum(1), (x * x).sum(1)]))
        raise _Seen

    hook = layer.register_forward_pre_hook(measure)
    try:
        for images in batches:
            try:
                net(images)
            except _Seen:
                pass
    finally:
        hook.remove()
    count, total, squares = torch.stack(sums).sum(0)
    mean = total / count
    var = (squares / count - mean**2).clamp(min=0) * count / (count - 1).clamp(min=1)
    return mean.to(layer.running_mean.dtype), var.to(layer.running_var.dtype)


def statistics_shift(before: nn.Module, after: nn.Module) -> list[dict[str, Any]]:
    """Per batch-norm layer, how far the adaptation moved its statistics: the channels' mean
    |new mean - old mean| in old standard deviations, and the geometric mean of new variance / old."""
    old = dict(before.named_modules())
    shifts = []
    for name, layer in after.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            source = old[name]
            sd = source.running_var.double().sqrt().clamp(min=1e-12)
            shifts.append({"layer": name, "channels": layer.num_features,
                           "mean_shift_sd": float(((layer.running_mean.double() - source.running_mean.double()).abs() / sd).mean()),
                           "variance_ratio": float((layer.running_var.double() / source.running_var.double().clamp(min=1e-12)).log().mean().exp())})
    return shifts


def files_digest(paths: Iterable[Path]) -> str:
    """sha256 of the sorted file names: which images a checkpoint was adapted or recalibrated on."""
    return hashlib.sha256("\n".join(sorted(path_text(p) for p in paths)).encode()).hexdigest()


def adapted_module(module: Any, method: str, chunks: Iterable[Tensor]) -> tuple[Any, int]:
    """A copy of `module` adapted to the uint8 images of `chunks` ((n, C, S, S) each, never their
    labels): `bn` (AdaBN, the images normalized as the module normalizes) or `normalization` (the
    images' own pixel mean and standard deviation). Returns it and the number of images."""
    from xray_cls.data import chunks_mean_std, normalize

    adapted = copy.deepcopy(module)
    prep = module.hparams.preprocessing
    images = [chunk for chunk in chunks if len(chunk)]  # held: bn reads them once per batch-norm layer
    if not images:
        raise UserInputError("there are no images to adapt on; expected a folder of the site's images")
    if method == "normalization":
        mean, std = chunks_mean_std(images)
        adapted.hparams.preprocessing = {**prep, "mean": mean, "std": std}
        log.info("site normalization: mean %.4f, std %.4f (the train split's: %.4f, %.4f)", mean, std, prep["mean"], prep["std"])
    else:
        seen = adapt_batch_norm(adapted.net, [normalize(chunk, prep["mean"], prep["std"]) for chunk in images])
        log.info("batch-norm statistics of %d layers re-estimated on %d site images", len(batch_norm_layers(adapted.net)), seen)
    return adapted.eval(), sum(len(chunk) for chunk in images)


def in_batches(images: Tensor, size: int = ADAPT_BATCH) -> Iterable[Tensor]:
    return (images[i : i + size] for i in range(0, len(images), size))


def check_two_classes(module: Any, what: str, ckpt: Any) -> None:
    """Recalibration moves a threshold on one probability; a model of three or more classes has none."""
    if not module.binary:
        raise UserInputError(
            f"{what} recalibrates the threshold of a two-class model; ckpt={ckpt} tells {module.num_classes} classes apart "
            "and calls each image its most probable class; expected a checkpoint of a two-class task"
        )


def recalibrated_choices(choices: ValChoices, logits: Tensor, labels: Tensor, target_sensitivity: float,
                         names: Sequence[str] = PNEUMONIA.classes) -> ValChoices:
    """The temperature (when `choices` have one) and the threshold by `choices`' own rule, chosen on
    the site's labeled images alone; a class with few images gets a warning."""
    counts = torch.bincount(labels, minlength=2).tolist()
    if min(counts) == 0:
        raise UserInputError(
            f"the calibration images hold one class only ({'/'.join(names)} = {counts}); expected images of both classes"
        )
    if min(counts) < MIN_IMAGES_PER_CLASS:
        log.warning("recalibrating on %s %s images: fewer than %d of a class make a rough threshold",
                    counts, "/".join(names), MIN_IMAGES_PER_CLASS)
    target = choices.target_sensitivity or target_sensitivity
    return choose_on_val(logits, labels, choices.calibration, choices.rule, choices.threshold, target, on="site calibration")


def operating_point(choices: ValChoices, logits: Tensor, labels: Tensor, resamples: int, confidence: float, seed: int,
                    names: Sequence[str]) -> dict[str, Any]:
    """The operating point of `choices` on the calibration images (those a recalibration chose it
    on): per-class counts, sensitivity and specificity at the threshold, with bootstrap intervals."""
    from xray_cls.metrics.bootstrap import bootstrap_intervals

    probs = torch.sigmoid(logits.double() / choices.temperature)
    called, positive = probs > choices.threshold, labels.bool()
    point = {
        "images": dict(zip(names, torch.bincount(labels, minlength=2).tolist())),
        "threshold": choices.threshold,
        "temperature": choices.temperature,
        "rule": choices.rule,
        "sensitivity": float((called & positive).sum() / positive.sum().clamp(min=1)),
        "specificity": float((~called & ~positive).sum() / (~positive).sum().clamp(min=1)),
    }
    if resamples:
        intervals = bootstrap_intervals(probs, labels, choices.threshold, resamples, confidence, seed)
        point["ci"] = {"confidence": confidence, "sensitivity": intervals["recall"], "specificity": intervals["specificity"]}
    return point


def checkpoint_with(source: dict[str, Any], module: Any, record_key: str, record: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint for evaluate and predict: the source's, with `module`'s weights and buffers,
    preprocessing and choices, and `record` (its provenance) under `record_key`. The training state
    (optimizer, loops, callbacks) is left out: it no longer belongs to these weights."""
    kept = {k: v for k, v in source.items() if k not in ("optimizer_states", "lr_schedulers", "callbacks", "loops")}
    kept["state_dict"] = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    hparams = dict(source["hyper_parameters"])
    hparams.update(preprocessing=dict(module.hparams.preprocessing), **module.choices.hparams())
    hparams[record_key] = record
    kept["hyper_parameters"] = hparams
    return kept
