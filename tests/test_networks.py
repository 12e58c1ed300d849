"""Networks: parameter counts by hand, shapes for any input size, dropout on and off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xray_cls.core.errors import UserInputError
from xray_cls.models.networks import CNN, MLP, ResNet
from xray_cls.reports.network_summary import network_summary, parameter_counts


def dense_params(widths: list[int]) -> int:
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


@pytest.mark.parametrize("size", [28, 64])
def test_mlp_parameter_count(size: int) -> None:
    net = MLP(in_channels=1, image_size=size, hidden=[256, 128, 64], dropout=0.5)
    expected = dense_params([size * size, 256, 128, 64, 1])
    assert parameter_counts(net) == {"total": expected, "trainable": expected, "non_trainable": 0}


@pytest.mark.parametrize("size", [28, 64, 30])
def test_cnn_parameter_count(size: int) -> None:
    net = CNN(in_channels=1, image_size=size, channels=[32, 64], kernel_size=3, hidden=[128], dropout=0.5)
    conv = (3 * 3 * 1 * 32 + 32) + (3 * 3 * 32 * 64 + 64)
    flat = 64 * (size // 2 // 2) ** 2
    assert parameter_counts(net)["total"] == conv + dense_params([flat, 128, 1])


def test_frozen_parameters_count_as_non_trainable() -> None:
    net = CNN(in_channels=1, image_size=28)
    for p in net.features.parameters():
        p.requires_grad_(False)
    counts = parameter_counts(net)
    assert counts["non_trainable"] == sum(p.numel() for p in net.features.parameters()) > 0
    assert counts["trainable"] + counts["non_trainable"] == counts["total"]


@pytest.mark.parametrize("net_cls", [MLP, CNN])
@pytest.mark.parametrize("channels,size", [(1, 28), (1, 64), (3, 32)])
def test_one_logit_per_image(net_cls: type[nn.Module], channels: int, size: int) -> None:
    net = net_cls(in_channels=channels, image_size=size)
    assert net(torch.zeros(5, channels, size, size)).shape == (5,)


@pytest.mark.parametrize("net_cls", [MLP, CNN])
def test_dropout_zero_removes_dropout_layers(net_cls: type[nn.Module]) -> None:
    off = net_cls(in_channels=1, image_size=28, dropout=0)
    on = net_cls(in_channels=1, image_size=28, dropout=0.3)
    assert not [m for m in off.modules() if isinstance(m, nn.Dropout)]
    rates = [m.p for m in on.modules() if isinstance(m, nn.Dropout)]
    assert rates and set(rates) == {0.3}
    assert parameter_counts(off) == parameter_counts(on)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_invalid_dropout_is_named(dropout: float) -> None:
    with pytest.raises(UserInputError, match=f"model.dropout={dropout!r} is not valid"):
        MLP(in_channels=1, image_size=28, dropout=dropout)


def test_summary_lists_layers_and_totals() -> None:
    net = CNN(in_channels=1, image_size=28)
    text = network_summary(net, (1, 28, 28))
    assert "(64, 7, 7)" in text  # second conv block output after two poolings
    assert f"total params {parameter_counts(net)['total']:,}" in text
    assert net.training  # the summary's forward pass leaves the mode as it was


@pytest.mark.parametrize("channels,size", [(1, 28), (1, 64), (3, 32), (1, 128)])
def test_resnet_gives_one_logit_per_image(channels: int, size: int) -> None:
    net = ResNet(in_channels=channels, image_size=size)
    assert net(torch.zeros(3, channels, size, size)).shape == (3,)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_resnet_size_does_not_depend_on_the_image_size_below_the_strided_stem() -> None:
    assert parameter_counts(ResNet(1, 28))["total"] == parameter_counts(ResNet(1, 64))["total"]
    small, big = ResNet(1, 28, widths=[8, 16]), ResNet(1, 28, widths=[16, 32])
    assert parameter_counts(small)["total"] < parameter_counts(big)["total"]


def test_resnet_dropout_zero_removes_dropout() -> None:
    assert not [m for m in ResNet(1, 28, dropout=0).modules() if isinstance(m, nn.Dropout)]
    assert [m.p for m in ResNet(1, 28, dropout=0.3).modules() if isinstance(m, nn.Dropout)] == [0.3]
