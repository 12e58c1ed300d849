"""The LightningModule's own metric and its guard against a diverging run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchmetrics.classification import BinaryAccuracy

from xray_cls.core.errors import TrainingDivergedError, UserInputError
from xray_cls.metrics.bootstrap import bootstrap_intervals
from xray_cls.metrics.thresholds import choose_threshold
from xray_cls.models.classifier import LossAccuracy, XrayClassifier
from xray_cls.train import train
from xray_cls.training.losses import label_smoothing, positive_class_weight

from conftest import SHORT_RUN, compose_config


def test_loss_accuracy_matches_torchmetrics_over_uneven_batches() -> None:
    torch.manual_seed(0)
    stats, reference = LossAccuracy(threshold=0.3), BinaryAccuracy(threshold=0.3)
    losses, sizes = [], []
    for size in (32, 32, 7):
        probs, labels = torch.rand(size), torch.randint(0, 2, (size,))
        loss = torch.rand(())
        stats.update(loss, probs, labels)
        reference.update(probs, labels)
        losses.append(loss.item())
        sizes.append(size)
    result = stats.compute()
    assert result["acc"].item() == pytest.approx(reference.compute().item(), abs=1e-6)
    expected_loss = sum(l * n for l, n in zip(losses, sizes)) / sum(sizes)
    assert result["loss"].item() == pytest.approx(expected_loss, rel=1e-5)


def test_a_diverging_run_stops_with_a_clear_error(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, [*SHORT_RUN, "optimizer.lr=1e30"])
    with pytest.raises(TrainingDivergedError, match="training loss is nan in epoch 0; try a lower optimizer.lr"):
        train(cfg)


@pytest.mark.parametrize("setting,expected", [(None, None), ("balanced", 1214 / 3494), (2, 2.0), (0.5, 0.5)])
def test_positive_class_weight(setting: object, expected: float | None) -> None:
    assert positive_class_weight(setting, [1214, 3494]) == expected


@pytest.mark.parametrize("setting", ["heavy", -1, 0, True])
def test_invalid_positive_class_weight_is_named(setting: object) -> None:
    with pytest.raises(UserInputError, match=f"loss.pos_weight={setting!r} is not valid"):
        positive_class_weight(setting, [1, 1])


def test_pos_weight_scales_the_loss_of_positive_images() -> None:
    net = {"_target_": "xray_cls.models.networks.MLP", "in_channels": 1, "image_size": 4, "hidden": [], "dropout": 0}
    optimizer = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
    plain = XrayClassifier(net=net, optimizer=optimizer)
    weighted = XrayClassifier(net=net, optimizer=optimizer, pos_weight=0.25)
    logits, labels = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    per_image = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    weights = torch.where(labels == 1, 0.25, 1.0)
    assert plain.loss(logits, labels).item() == pytest.approx(per_image.mean().item())
    assert weighted.loss(logits, labels).item() == pytest.approx((per_image * weights).mean().item())


def test_label_smoothing_softens_the_training_targets_only() -> None:
    net = {"_target_": "xray_cls.models.networks.MLP", "in_channels": 1, "image_size": 4, "hidden": [], "dropout": 0}
    module = XrayClassifier(net=net, label_smoothing=0.2)
    torch.manual_seed(0)
    images, labels = torch.randn(6, 1, 4, 4), torch.tensor([1, 0, 1, 1, 0, 0])
    logits = module(images).detach()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    smoothed = bce(logits, torch.tensor([0.9, 0.1, 0.9, 0.9, 0.1, 0.1]))
    assert module.training_step((images, labels), 0).item() == pytest.approx(smoothed.item(), rel=1e-6)
    loss, _, _ = module._step((images, labels))  # validation and test: the plain loss
    assert loss.item() == pytest.approx(bce(logits, labels.float()).item(), rel=1e-6)
    assert abs(loss.item() - smoothed.item()) > 1e-3


@pytest.mark.parametrize("setting", [1, -0.1, "some", True])
def test_invalid_label_smoothing_is_named(setting: object) -> None:
    with pytest.raises(UserInputError, match=f"loss.label_smoothing={setting!r} is not valid"):
        label_smoothing(setting)


def test_bootstrap_interval_of_accuracy_matches_the_binomial_spread() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (400,))
    right = torch.rand(400) < 0.8  # 80% of the calls are right
    probs = torch.where(right, labels.float(), 1 - labels.float()) * 0.8 + 0.1
    ci = bootstrap_intervals(probs, labels, 0.5, resamples=2000, confidence=0.95, seed=0)
    accuracy = right.float().mean().item()
    half_width = 1.96 * (accuracy * (1 - accuracy) / 400) ** 0.5
    assert ci["accuracy"][0] == pytest.approx(accuracy - half_width, abs=0.01)
    assert ci["accuracy"][1] == pytest.approx(accuracy + half_width, abs=0.01)
    assert ci == bootstrap_intervals(probs, labels, 0.5, resamples=2000, confidence=0.95, seed=0)


def test_bootstrap_of_a_perfect_ranking_is_certain() -> None:
    labels = torch.tensor([0] * 50 + [1] * 50)
    probs = torch.linspace(0.01, 0.99, 100)
    ci = bootstrap_intervals(probs, labels, 0.5, resamples=200, confidence=0.95, seed=1)
    assert ci["auroc"] == pytest.approx([1.0, 1.0])
    assert ci["recall"] == [1.0, 1.0] and ci["specificity"] == [1.0, 1.0]


def random_predictions(seed: int, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    probs = (0.35 * labels + 0.65 * torch.rand(n, generator=generator)).clamp(0, 1)
    return probs, labels


def rates(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> tuple[float, float]:
    called, positive = probs > threshold, labels.bool()
    return (called & positive).sum().item() / positive.sum().item(), (~called & ~positive).sum().item() / (~positive).sum().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_youden_threshold_beats_every_other_threshold(seed: int) -> None:
    probs, labels = random_predictions(seed)
    chosen = choose_threshold("youden", probs, labels, fixed=0.5, target_sensitivity=0.95)
    sens, spec = rates(probs, labels, chosen["threshold"])
    assert (sens, spec) == pytest.approx((chosen["val_sensitivity"], chosen["val_specificity"]))
    for t in torch.linspace(0, 1, 501).tolist():  # an independent search over a fine grid
        assert sum(rates(probs, labels, t)) <= sens + spec + 1e-9


def test_youden_neutral_takes_the_threshold_nearest_one_half_within_one_image_of_the_best() -> None:
    # 20 NORMAL, 40 PNEUMONIA: one NORMAL at 0.3 among the PNEUMONIA images, which reach down to 0.1.
    normal = torch.cat([torch.linspace(0.0, 0.05, 19), torch.tensor([0.3])])
    pneumonia = torch.linspace(0.1, 1.0, 40)
    probs, labels = torch.cat([normal, pneumonia]), torch.tensor([0] * 20 + [1] * 40)
    youden = choose_threshold("youden", probs, labels, fixed=0.5, target_sensitivity=0.95)
    neutral = choose_threshold("youden_neutral", probs, labels, fixed=0.5, target_sensitivity=0.95)
    assert youden["threshold"] < 0.1  # every PNEUMONIA image called, the NORMAL one at 0.3 too
    assert (youden["val_sensitivity"], youden["val_specificity"]) == pytest.approx((1.0, 19 / 20))
    # Within 1/20 of the best J: any cut up to the 0.3 NORMAL image costs PNEUMONIA images of 1/40
    # each, so two of them (J 0.95 - 2/40) are allowed; the third is not. 0.5 itself is not.
    sens, spec = rates(probs, labels, neutral["threshold"])
    assert (sens, spec) == pytest.approx((neutral["val_sensitivity"], neutral["val_specificity"]))
    assert sens + spec >= youden["val_sensitivity"] + youden["val_specificity"] - 1 / 20 - 1e-9
    pneumonia_below = int((pneumonia <= neutral["threshold"]).sum())
    assert pneumonia_below == 2 and neutral["threshold"] < pneumonia[2]
    wide = choose_threshold("youden_neutral", torch.tensor([0.01, 0.02, 0.98, 0.99]), torch.tensor([0, 0, 1, 1]), 0.5, 0.95)
    assert wide["threshold"] == pytest.approx(0.5)  # separable: the middle of the gap, not its edge


@pytest.mark.parametrize("target", [0.8, 0.95, 1.0])
def test_sensitivity_threshold_is_the_highest_that_reaches_the_target(target: float) -> None:
    probs, labels = random_predictions(3)
    chosen = choose_threshold("sensitivity", probs, labels, fixed=0.5, target_sensitivity=target)
    sens, _ = rates(probs, labels, chosen["threshold"])
    assert sens >= target
    above = probs[probs > chosen["threshold"]].min().item()  # the next cut up loses a positive
    assert rates(probs, labels, above)[0] < target


def test_fixed_threshold_reports_its_val_rates() -> None:
    probs, labels = random_predictions(4)
    chosen = choose_threshold("fixed", probs, labels, fixed=0.6, target_sensitivity=0.95)
    assert chosen["threshold"] == 0.6
    assert (chosen["val_sensitivity"], chosen["val_specificity"]) == pytest.approx(rates(probs, labels, 0.6))


def test_unknown_threshold_rule_lists_the_rules() -> None:
    probs, labels = random_predictions(5)
    with pytest.raises(UserInputError, match="threshold_rule='best'.*expected one of fixed, youden, youden_neutral, sensitivity"):
        choose_threshold("best", probs, labels, fixed=0.5, target_sensitivity=0.95)


def test_applied_choices_move_every_thresholded_test_metric() -> None:
    from xray_cls.metrics.val_choices import ValChoices

    net = {"_target_": "xray_cls.models.networks.MLP", "in_channels": 1, "image_size": 4, "hidden": [], "dropout": 0}
    module = XrayClassifier(net=net, optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})
    module.apply_choices(ValChoices(threshold=0.8))
    probs, labels = torch.tensor([0.7, 0.9, 0.2]), torch.tensor([1, 1, 0])
    module.test_confusion.update(probs, labels)
    module.test_scores.update(probs, labels)
    assert module.test_confusion.compute().tolist() == [[1, 0], [1, 1]]  # 0.7 is now NORMAL
    assert module.test_scores.compute()["recall"].item() == pytest.approx(0.5)
