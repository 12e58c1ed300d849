"""Train-time augmentation: Keras-style random contrast, translation and zoom, drawn per image and
applied to whole batches on the device."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from xray_cls.core.options import check_choice, check_number
from xray_cls.data.options import AUGMENTATIONS


@dataclass(frozen=True)
class Augment:
    """Factors with the meaning of Keras' RandomContrast, RandomTranslation and RandomZoom.

    contrast f: contrast scaled by a factor in [1-f, 1+f] around each image's mean.
    translate f: shifted by up to f of the image size, independently along each axis.
    zoom f: zoomed by a factor in [1-f, 1+f] (above 1 zooms out), aspect ratio kept.
    aspect f: width alone scaled by a factor in [1/(1+f), 1+f] (log-uniform). Folders whose images
      were stretched to squares carry each original's aspect ratio in the anatomy's proportions,
      and it differs by class in Kermany's data; this jitter stops a network from learning that.
    """

    contrast: float = 0.0
    translate: float = 0.0
    zoom: float = 0.0
    aspect: float = 0.0


AUGMENT_PRESETS = dict(zip(AUGMENTATIONS, (  # the names data.aug takes (xray_cls.data.options)
    Augment(),
    Augment(contrast=0.1, translate=0.12, zoom=0.13),  # mild
    Augment(contrast=0.2, translate=0.23, zoom=0.27),  # strong
)))


class BatchAugment(nn.Module):
    """Random contrast, translation and zoom, drawn per image, applied to a whole batch at once.

    torchvision's RandomAffine draws one set of parameters per call, i.e. per batch; this draws one
    per image and samples all of them with a single `grid_sample`. Borders are reflected, as Keras
    does by default.
    """

    def __init__(self, augment: Augment) -> None:
        super().__init__()
        self.augment = augment

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float (N, C, H, W) in [0, 1]; returns the same shape, still in [0, 1]."""
        a, n = self.augment, images.shape[0]
        if a.translate or a.zoom or a.aspect:
            scale = 1 + a.zoom * _uniform(n, images)
            # theta maps output to input coordinates: a factor above 1 samples a wider span, squeezing the image.
            width = torch.exp(math.log1p(a.aspect) * _uniform(n, images))
            # affine_grid spans [-1, 1], so a shift by a fraction f of the size is 2f.
            shift = 2 * a.translate * _uniform((n, 2), images)
            theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
            theta[:, 0, 0] = scale * width
            theta[:, 1, 1] = scale
            theta[:, :, 2] = shift
            grid = F.affine_grid(theta, list(images.shape), align_corners=False)
            images = F.grid_sample(images, grid, padding_mode="reflection", align_corners=False)
        if a.contrast:
            factor = (1 + a.contrast * _uniform(n, images)).view(n, 1, 1, 1)
            mean = images.mean(dim=(1, 2, 3), keepdim=True)
            images = ((images - mean) * factor + mean).clamp(0, 1)
        return images


def _uniform(shape: int | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Uniform in [-1, 1] on the device of `like`, from the global (seeded) generator."""
    return torch.rand(shape, device=like.device, dtype=like.dtype) * 2 - 1


def mixup(images: torch.Tensor, labels: torch.Tensor, alpha: float, num_classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """mixup (Zhang et al., 2018): the batch blended with a shuffled copy of itself, images and labels
    alike, by one Beta(alpha, alpha) weight. Labels come back as float soft targets: (N,) for two
    classes, (N, K) class shares for K >= 3."""
    weight = torch.distributions.Beta(alpha, alpha).sample().to(images.device, images.dtype)
    order = torch.randperm(images.shape[0], device=images.device)
    soft = labels.to(images.dtype) if num_classes == 2 else torch.nn.functional.one_hot(labels, num_classes).to(images.dtype)
    return weight * images + (1 - weight) * images[order], weight * soft + (1 - weight) * soft[order]


def check_mixup(alpha: float) -> float:
    return float(check_number("data.mixup", alpha, 0, 10, expected="a number in [0, 10] (0: off)"))


def augment_preset(name: str, aspect: float = 0.0) -> Augment:
    """The preset `name`, with aspect-ratio jitter `aspect` on top."""
    check_choice("data.aug", name, AUGMENT_PRESETS, "a known augmentation preset")
    return replace(AUGMENT_PRESETS[name], aspect=float(check_number("data.aspect", aspect, 0, 10, high_open=True)))
