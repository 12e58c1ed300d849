"""The field's networks as the study's are: torchvision's classification models and timm's, by
exact name, as plain nn.Modules that take (N, C, S, S) images and give the classifier's logits.

The architecture alone is built here, never weights: a checkpoint rebuilds its network from these
arguments and fills it with its own state dict, so loading one never reads or downloads anything
else. Pretrained weights are loaded into a new run's network by `xray_cls.models.pretrained`.

One-channel X-rays go in as one channel: the first convolution takes `in_channels` inputs (the
pretrained RGB filters are summed into it when weights are loaded), and the classifier head is
replaced by one of the task's width (`heads.output_width`).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import Tensor, nn

from xray_cls.core.errors import UserInputError
from xray_cls.models.heads import class_logits, output_width

IMAGENET_CLASSES = 1000  # the width of every builder's own head, by which the head is found


# Builders whose defaults do not fit a plain network: auxiliary heads off (they return tuples in
# training) and no RGB input transform (the input is one channel).
BUILDER_ARGUMENTS = {
    "inception_v3": {"aux_logits": False, "init_weights": False, "transform_input": False},
    "googlenet": {"aux_logits": False, "init_weights": False, "transform_input": False},
}


AUXILIARY_KEYS = ("AuxLogits.", "aux1.", "aux2.")  # in their ImageNet weights, absent here


@cache
def torchvision_names() -> tuple[str, ...]:
    """The classification builders torchvision lists (not its detection or video models)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


@cache
def timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def check_name(library: str, name: Any, names: tuple[str, ...]) -> str:
    if not isinstance(name, str) or name not in names:
        close = [n for n in names if isinstance(name, str) and n.startswith(name[:4])][:8]
        raise UserInputError(
            f"model.name={str(name)[:100]!r} is not a classification model of {library}; expected one of the "
            f"{len(names)} names of its list" + (f", e.g. {', '.join(close)}" if close else " (resnet18, densenet121, ...)")
        )
    return name


def find_head(model: nn.Module) -> str:
    """The name of a builder's classifier layer: the last layer that outputs the 1,000 ImageNet classes."""
    heads = [name for name, m in model.named_modules()
             if (isinstance(m, nn.Linear) and m.out_features == IMAGENET_CLASSES)
             or (isinstance(m, nn.Conv2d) and m.out_channels == IMAGENET_CLASSES)]
    if not heads:
        raise UserInputError(f"{type(model).__name__} has no classifier layer of {IMAGENET_CLASSES} outputs to replace")
    return heads[-1]


def first_conv(model: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))


def with_input_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A fresh copy of `conv` taking `in_channels` inputs."""
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None, conv.padding_mode)


def with_outputs(head: nn.Module, width: int) -> nn.Module:
    if isinstance(head, nn.Linear):
        return nn.Linear(head.in_features, width)
    return nn.Conv2d(head.in_channels, width, head.kernel_size)  # squeezenet's 1x1 classifier


def drop_relu_after(model: nn.Module, head_name: str) -> None:
    """A convolution head followed by a ReLU (squeezenet's) would give logits >= 0: the ReLU goes."""
    parent_name, _, index = head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.Sequential) and index.isdigit():
        for i in range(int(index) + 1, len(parent)):
            if isinstance(parent[i], nn.ReLU):
                parent[i] = nn.Identity()


class TorchvisionNet(nn.Module):
    """`torchvision.models.get_model(name)` with `in_channels` inputs and the task's head."""

    def __init__(self, in_channels: int, image_size: int, name: str = "resnet18", num_classes: int = 2) -> None:
        import torchvision

        super().__init__()
        self.name = check_name("torchvision", name, torchvision_names())
        arguments = dict(BUILDER_ARGUMENTS.get(name, {}))
        if name.startswith("vit_"):
            arguments["image_size"] = image_size  # a ViT's position embedding is sized to its input
        try:
            model = torchvision.models.get_model(name, weights=None, **arguments)
        except (ValueError, TypeError, RuntimeError, AssertionError) as err:
            raise UserInputError(f"model.name={name} cannot be built at data.image_size={image_size} ({str(err)[:200]})") from None
        self.first_conv_name, self.head_name = first_conv(model), find_head(model)
        drop_relu_after(model, self.head_name)
        model.set_submodule(self.first_conv_name, with_input_channels(model.get_submodule(self.first_conv_name), in_channels))
        model.set_submodule(self.head_name, with_outputs(model.get_submodule(self.head_name), output_width(num_classes)))
        self.model = model
        self.check_size(in_channels, image_size)

    def check_size(self, in_channels: int, image_size: int) -> None:
        """A network whose downsampling leaves nothing of the image fails at its first batch: fail here, in one line."""
        device = next(self.model.parameters()).device  # on the meta device (a checkpoint's check) it costs nothing
        try:
            with torch.no_grad():
                self.model.eval()(torch.zeros(1, in_channels, image_size, image_size, device=device))
            self.model.train()
        except (RuntimeError, ValueError, AssertionError) as err:
            raise UserInputError(
                f"model.name={self.name} cannot take {image_size} px images ({str(err).splitlines()[0][:150]}); "
                "expected a larger data.image_size"
            ) from None

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return class_logits(out.flatten(1))  # squeezenet: (N, K, 1, 1)

    def load_pretrained(self, state: dict[str, Tensor], source: str) -> None:
        """The builder's own (ImageNet) state dict: every tensor but the head's; the first
        convolution's RGB filters summed into its input channels when they differ."""
        conv_key = f"{self.first_conv_name}.weight"
        head = f"{self.head_name}."
        kept = {k: v for k, v in state.items() if not k.startswith(head) and not k.startswith(AUXILIARY_KEYS)}
        own = self.model.state_dict()
        if conv_key in kept and kept[conv_key].shape[1] != own[conv_key].shape[1]:
            kept[conv_key] = summed_filters(kept[conv_key], own[conv_key].shape[1])
        load_matching(self.model, kept, [k for k in own if k.startswith(head)], source)


def summed_filters(weight: Tensor, in_channels: int) -> Tensor:
    """RGB filters (out, 3, k, k) for one input channel: their sum, so that a gray image gives what
    the same image in three equal channels gave; for more channels, the mean spread over them."""
    total = weight.sum(dim=1, keepdim=True)
    return total if in_channels == 1 else total.repeat(1, in_channels, 1, 1) / in_channels


def load_matching(model: nn.Module, state: dict[str, Tensor], left_out: list[str], source: str) -> None:
    """`state` into `model`: exactly its tensors but `left_out` (the new head), each of its shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - set(left_out))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        key = (missing or unexpected or wrong)[0]
        what = "lacks" if missing else ("has the extra tensor" if unexpected else "has another shape for")
        raise UserInputError(f"{source} does not hold this network's weights: it {what} {key} "
                             f"({len(missing)} missing, {len(unexpected)} extra, {len(wrong)} of another shape)")
    model.load_state_dict(state, strict=False)


class TimmNet(nn.Module):
    """`timm.create_model(name, in_chans=in_channels, num_classes=...)`: timm's own one-channel
    stem and head (the optional extra `pip install 'xray_cls[timm]'`)."""

    def __init__(self, in_channels: int, image_size: int, name: str = "resnet18", num_classes: int = 2) -> None:
        try:
            import timm
        except ImportError:
            raise UserInputError("model=timm needs the timm package; pip install 'xray_cls[timm]'") from None
        super().__init__()
        self.name = check_name("timm", name, timm_names())
        self.in_channels, self.num_classes = in_channels, num_classes
        arguments = {"pretrained": False, "in_chans": in_channels, "num_classes": output_width(num_classes)}
        try:
            try:  # transformers are built for their input size; the other networks take no img_size
                self.model = timm.create_model(name, img_size=image_size, **arguments)
            except TypeError:
                self.model = timm.create_model(name, **arguments)
        except (ValueError, TypeError, RuntimeError, AssertionError) as err:
            raise UserInputError(f"model.name={name} cannot be built at data.image_size={image_size} ({str(err)[:200]})") from None

    def forward(self, x: Tensor) -> Tensor:
        return class_logits(self.model(x))
