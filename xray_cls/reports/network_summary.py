"""A network's parameter counts and its layer-by-layer summary, as the study reports them."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn


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
