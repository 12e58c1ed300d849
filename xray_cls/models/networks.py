"""The study's networks as plain nn.Modules: each maps (N, C, S, S) images to (N,) logits of the
positive class (PNEUMONIA) for two classes, or to (N, K) logits, one per class, for K >= 3.

`in_channels`, `image_size` and `num_classes` come from the data and the task at run time, the rest
from `conf/model/`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from xray_cls.core.errors import UserInputError
from xray_cls.core.legacy_names import canonical
from xray_cls.core.options import check_choice, check_number
from xray_cls.models.backbones import TimmNet, TorchvisionNet
from xray_cls.models.heads import class_logits, output_width


def _check_dropout(dropout: float) -> float:
    return float(check_number("model.dropout", dropout, 0, 1, high_open=True))


def dense_head(in_features: int, hidden: Sequence[int], dropout: float, num_classes: int = 2) -> nn.Sequential:
    """Dense layers (ReLU, then dropout when > 0) ending in the logits (`output_width`)."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = width
    layers.append(nn.Linear(in_features, output_width(num_classes)))
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """The study's dense network: flattened pixels, three hidden dense layers with dropout."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        hidden: Sequence[int] = (256, 128, 64),
        dropout: float = 0.5,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.head = dense_head(in_channels * image_size * image_size, hidden, _check_dropout(dropout), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return class_logits(self.head(self.flatten(x)))


class CNN(nn.Module):
    """The study's CNN: convolution blocks (conv 'same', ReLU, 2x2 max-pool), then a dense head."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        channels: Sequence[int] = (32, 64),
        kernel_size: int = 3,
        hidden: Sequence[int] = (128,),
        dropout: float = 0.5,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        size = image_size
        for width in channels:
            blocks += [
                nn.Conv2d(in_channels, width, kernel_size, padding="same"),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels, size = width, size // 2
        if size < 1:
            raise UserInputError(f"data.image_size={image_size} is too small for {len(channels)} pooling stages")
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.head = dense_head(in_channels * size * size, hidden, _check_dropout(dropout), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return class_logits(self.head(self.flatten(self.features(x))))


class ResNet(nn.Module):
    """A compact residual network with batch norm for 28 to 224 px inputs.

    torchvision's ResNet BasicBlocks in `len(widths)` stages (the first keeps the resolution, each
    later one halves it), a 3x3 stem that keeps small images whole (inputs of 96 px and more get
    torchvision's strided stem and max-pool), global average pooling, dropout, one logit.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 2,
        dropout: float = 0.2,
        num_classes: int = 2,
    ) -> None:
        from torchvision.models.resnet import BasicBlock  # only runs that use it pay the import

        super().__init__()
        if image_size >= 96:
            stem = [nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)]
            stem += [nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
        else:
            stem = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        blocks: list[nn.Module] = []
        channels = widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                downsample = None
                if stride != 1 or channels != width:
                    downsample = nn.Sequential(nn.Conv2d(channels, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
                blocks.append(BasicBlock(channels, width, stride=stride, downsample=downsample))
                channels = width
        self.features = nn.Sequential(*stem, *blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        dropout = _check_dropout(dropout)
        self.head = nn.Sequential(*([nn.Dropout(dropout)] if dropout > 0 else []), nn.Linear(channels, output_width(num_classes)))

    def forward(self, x: Tensor) -> Tensor:
        return class_logits(self.head(self.pool(self.features(x))))


HEADS = ("logit", "softmax2")


def output_layer(in_features: int, head: str, num_classes: int) -> nn.Linear:
    """The output layer: one logit (`logit`), or for two classes the two-way softmax of a Keras model
    (`softmax2`), whose two outputs become the same one logit (see `class_logits`). Three or more
    classes get one logit per class either way: a softmax over them."""
    check_choice("model.head", head, HEADS)
    return nn.Linear(in_features, 2 if head == "softmax2" and num_classes == 2 else output_width(num_classes))


class ReportCNN(nn.Module):
    """The course report's CNN, in Keras' defaults: Conv 3x3 'valid', 32 filters, ReLU; max-pool 2x2;
    Conv 3x3 'valid', 64 filters, ReLU; max-pool 2x2; flatten; dropout; Dense. At 256x256 gray
    with head=softmax2: 320 + 18,496 + 492,034 = 510,850 parameters, the report's count."""

    REPORTED = (510_850, 256, "softmax2")  # the report's parameter count, at this image size and head

    def __init__(self, in_channels: int, image_size: int, dropout: float = 0.5, head: str = "logit", num_classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        size = ((image_size - 2) // 2 - 2) // 2
        if size < 1:
            raise UserInputError(f"data.image_size={image_size} is too small for the report's CNN; expected at least 10")
        dropout = _check_dropout(dropout)
        self.head = nn.Sequential(nn.Flatten(), *([nn.Dropout(dropout)] if dropout > 0 else []), output_layer(64 * size * size, head, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return class_logits(self.head(self.features(x)))


class ReportDense(nn.Module):
    """The course report's dense network: Keras `Dense` layers of 2, 3 and 4 units on the image
    tensor, which act on its last axis, pixel by pixel (here as 1x1 convolutions, the same
    weights); then flatten, dropout and the output layer. At 256x256 gray with head=softmax2:
    4 + 9 + 16 + 524,290 = 524,319 parameters, the report's count (conf/model/report_dense.yaml
    says why this layout)."""

    REPORTED = (524_319, 256, "softmax2")  # the report's parameter count, at this image size and head

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        units: Sequence[int] = (2, 3, 4),
        activation: str = "relu",
        dropout: float = 0.5,
        head: str = "logit",
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        activations = {"relu": nn.ReLU, "linear": nn.Identity}
        check_choice("model.activation", activation, activations)
        layers: list[nn.Module] = []
        for width in units:
            layers += [nn.Conv2d(in_channels, width, 1), activations[activation]()]
            in_channels = width
        self.pixels = nn.Sequential(*layers)
        dropout = _check_dropout(dropout)
        self.head = nn.Sequential(
            nn.Flatten(), *([nn.Dropout(dropout)] if dropout > 0 else []), output_layer(in_channels * image_size * image_size, head, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return class_logits(self.head(self.pixels(x)))


# The networks a config or a checkpoint may name, by exact `_target_`: every nn.Module defined
# above, and torchvision's and timm's by their exact builder names (xray_cls.models.backbones).
NETWORKS: dict[str, type[nn.Module]] = {
    f"{__name__}.{obj.__name__}": obj
    for obj in list(globals().values())
    if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == __name__
}
NETWORKS.update({f"{net.__module__}.{net.__name__}": net for net in (TorchvisionNet, TimmNet)})
def canonical_target(target: object) -> object:
    """A network's `_target_` as NETWORKS names it: an older checkpoint's (xray_cls.networks.CNN) as today's."""
    return canonical(target)


def canonical_config(net: Mapping[str, Any]) -> dict[str, Any]:
    """A network config with its `_target_` named as NETWORKS names it."""
    return {**net, **({"_target_": canonical_target(net["_target_"])} if "_target_" in net else {})}


def build_network(cfg: Mapping[str, Any]) -> nn.Module:
    """The network of a `{"_target_": "xray_cls.models.networks.CNN", **arguments}` config: the class is
    looked up by its exact name in NETWORKS and called with the arguments as they are. Unlike
    Hydra's recursive instantiate, nothing inside the arguments is ever built, so a config read
    from a checkpoint cannot make this run other code."""
    arguments = dict(cfg)
    given = arguments.pop("_target_", None)
    target = canonical_target(given)
    if target not in NETWORKS:
        raise UserInputError(f"model._target_={given!r} is not a network of xray_cls; expected one of {', '.join(NETWORKS)}")
    return NETWORKS[target](**arguments)
