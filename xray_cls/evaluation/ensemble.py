"""Averaged predictions: several checkpoints (an ensemble) and test-time augmentation (TTA).

`evaluate` and `predict` take `ckpt=[a.ckpt,b.ckpt,c.ckpt]` and `tta=true`. The probability of
PNEUMONIA (of each class, for three or more) is the mean of each member's calibrated probability (its own temperature), over the
views of each image: with tta, the image and four copies shifted by TTA_SHIFT of its side (up,
down, left, right; the edge pixels repeated). No flips: left and right are not alike on a chest
X-ray (the heart is on the left), and training never flips (data.aug shifts, zooms and changes
contrast). The members must prepare images alike: same size, geometry, channels and normalization.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from xray_cls.core.errors import UserInputError

if TYPE_CHECKING:
    from xray_cls.models.classifier import XrayClassifier


TTA_SHIFT = 0.05  # of the image side, at least one pixel: 1 px at 28 px, 3 px at 64 px
TTA_VIEWS = 5  # the image and its four shifts (shifted_views)


def checkpoint_paths(ckpt: Any) -> list[str]:
    """`ckpt=a.ckpt` or `ckpt=[a.ckpt,b.ckpt]` as a list of paths."""
    from omegaconf import ListConfig

    paths = [str(p) for p in ckpt] if isinstance(ckpt, (list, tuple, ListConfig)) else [str(ckpt)]
    if not paths:
        raise UserInputError("ckpt=[] names no checkpoint; expected ckpt=best.ckpt or ckpt=[a.ckpt,b.ckpt]")
    return paths


def shifted_views(images: Tensor) -> list[Tensor]:
    """The images and four copies shifted by TTA_SHIFT of their side, edges repeated."""
    height, width = images.shape[-2:]
    s = max(1, round(TTA_SHIFT * min(height, width)))
    padded = F.pad(images, (s, s, s, s), mode="replicate")
    return [images] + [padded[..., s + dy : s + dy + height, s + dx : s + dx + width] for dy, dx in ((-s, 0), (s, 0), (0, -s), (0, s))]


class AveragedProbabilities(nn.Module):
    """The members' mean calibrated probability over the views of each image, returned as a logit,
    so that it takes a network's place in an XrayClassifier (whose temperature is then 1)."""

    def __init__(self, members: list[XrayClassifier], tta: bool) -> None:
        super().__init__()
        self.nets = nn.ModuleList(member.net for member in members)
        self.temperatures = [member.temperature for member in members]
        self.tta = tta

    def forward(self, images: Tensor) -> Tensor:
        from xray_cls.metrics.calibration import probabilities

        views = shifted_views(images) if self.tta else [images]
        probs = torch.stack([probabilities(net(view).double(), t) for net, t in zip(self.nets, self.temperatures) for view in views])
        mean = probs.mean(0)
        # The logit of the mean probability; K classes: its log, whose softmax is the mean again.
        return torch.logit(mean, eps=1e-12) if mean.dim() == 1 else mean.clamp(min=1e-12).log()


def load_averaged(paths: list[str], tta: bool) -> XrayClassifier:
    """One checkpoint's classifier as `load_classifier` gives it, or, for several checkpoints or
    tta, a classifier whose probabilities are their average (its threshold: the first's, until
    the caller chooses one for the average)."""
    from xray_cls.models.checkpoints import load_classifier

    members = [load_classifier(path) for path in paths]
    if len(members) == 1 and not tta:
        return members[0]
    first = members[0].hparams.preprocessing
    for path, member in zip(paths[1:], members[1:]):
        prep = member.hparams.preprocessing
        differs = sorted(k for k in set(first) | set(prep) if first.get(k) != prep.get(k))
        if differs:
            key = differs[0]
            raise UserInputError(
                f"ckpt={path} prepares images differently from ckpt={paths[0]} ({key} {prep.get(key)!r}, not "
                f"{first.get(key)!r}); an ensemble needs checkpoints trained on the same data and image size"
            )
    module = members[0]
    module.net = AveragedProbabilities(members, tta)
    module.apply_choices(replace(module.choices, temperature=1.0))  # each member's own temperature is applied inside
    return module.eval()


def describe(paths: list[str], tta: bool) -> str:
    what = f"an ensemble of {len(paths)} checkpoints" if len(paths) > 1 else Path(paths[0]).name
    return what + (f" with test-time augmentation ({TTA_VIEWS} views)" if tta else "")
