"""A network without its output layer: the features that layer reads, the backbone that computes them.

Every network of `networks.NETWORKS` ends in one output layer (a Linear, or squeezenet's 1x1
convolution): its classifier. Everything before it is the backbone, the part that pretraining
learns, fine-tuning freezes or trains slower, and a backbone file (`backbone_files`) holds.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn


def output_layer_name(net: nn.Module) -> str:
    """The dotted name of `net`'s output layer: torchvision's head and timm's classifier by their own
    record, the study's networks by their last Linear."""
    head_name = getattr(net, "head_name", None)  # TorchvisionNet
    if head_name is not None:
        return f"model.{head_name}"
    model = getattr(net, "model", None)
    if model is not None and hasattr(model, "get_classifier"):  # TimmNet
        classifier = model.get_classifier()
        return "model." + next(name for name, m in model.named_modules() if m is classifier)
    return [name for name, m in net.named_modules() if isinstance(m, nn.Linear)][-1]


def output_keys(net: nn.Module) -> list[str]:
    """The state-dict keys of the output layer: what a backbone file leaves out."""
    prefix = output_layer_name(net) + "."
    return [key for key in net.state_dict() if key.startswith(prefix)]


def backbone_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the output layer's."""
    head = set(map(id, net.get_submodule(output_layer_name(net)).parameters()))
    return [p for p in net.parameters() if id(p) not in head]


class Features(nn.Module):
    """A copy of `net` whose output layer is gone: (N, C, S, S) images -> (N, width) features, the
    input the output layer would have read (flattened). Its state dict is the backbone's, under the
    network's own names, so it loads back into the network with the output layer left new."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        name = output_layer_name(net)
        layer = net.get_submodule(name)
        self.width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        self.net = copy.deepcopy(net)
        tap = nn.Identity()
        self.net.set_submodule(name, tap)
        self._seen: list[Tensor] = []
        tap.register_forward_hook(self._keep)  # a bound method: a deepcopy (BYOL's momentum copy) keeps its own

    def _keep(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self._seen.append(inputs[0])

    def forward(self, x: Tensor) -> Tensor:
        self._seen.clear()
        self.net(x)  # the network's own forward, up to its output layer, whose input the tap keeps
        seen = self._seen.pop()
        return seen.mean((2, 3)) if seen.dim() == 4 else seen.flatten(1)  # squeezenet's 1x1 head reads a map: pooled

    def backbone_state(self) -> dict[str, Tensor]:
        return {key: value.detach().clone() for key, value in self.net.state_dict().items()}
