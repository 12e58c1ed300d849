"""The study's networks as plain nn.Modules: each maps (N, C, S, S) images to (N,) logits of PNEUMONIA.

`in_channels` and `image_size` come from the data at run time, the rest from `conf/model/`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from xray_cls.errors import UserInputError


def _check_dropout(dropout: float) -> float:
    if not 0 <= dropout < 1:
        raise UserInputError(f"model.dropout={dropout!r} is not valid; expected a number in [0, 1)")
    return float(dropout)


def dense_head(in_features: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    """Dense layers (ReLU, then dropout when > 0) ending in one logit."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = width
    layers.append(nn.Linear(in_features, 1))
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """The study's dense network: flattened pixels, three hidden dense layers with dropout."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        hidden: Sequence[int] = (256, 128, 64),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.head = dense_head(in_channels * image_size * image_size, hidden, _check_dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.flatten(x)).squeeze(1)


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
        self.head = dense_head(in_channels * size * size, hidden, _check_dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.flatten(self.features(x))).squeeze(1)
