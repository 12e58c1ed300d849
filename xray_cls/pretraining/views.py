"""The two random views of each X-ray that a self-supervised method learns to match.

lightly's SimCLR view transform, set for gray chest X-rays (`conf/pretrain.yaml`, `views:`):
- a random crop of `min_scale` to all of the image's area, resized back: 0.3 by default, not
  ImageNet's 0.08, which on a 28 px chest leaves a patch of rib with nothing to tell;
- a small rotation (`rotation` degrees either way), as a patient is never quite straight;
- brightness and contrast jitter, as exposure and detector differ; no saturation or hue (one
  channel has none) and no random grayscale;
- Gaussian blur, its sigma given in pixels at 224 px and scaled to the image size;
- no horizontal flip by default (`hflip_prob: 0`): a chest is not symmetric (the heart, the aortic
  knob and the gastric bubble are on the left, and films carry L/R markers), and a flip would
  teach features that cannot tell a chest from its mirror image, situs inversus included. Pneumonia
  itself appears on either side, so MoCo-CXR's recipe flips; `views.hflip_prob=0.5` does the same.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset


def view_transform(views: Any, image_size: int, mean: float, std: float) -> Any:
    """lightly's SimCLRTransform (two views of an image) with the `views` settings, normalizing by `mean` and `std` (0-1 pixels)."""
    from lightly.transforms import SimCLRTransform

    scale = image_size / 224  # the blur's sigma is set at 224 px
    return SimCLRTransform(
        input_size=image_size, min_scale=float(views.min_scale),
        cj_prob=float(views.jitter_prob), cj_strength=1.0, cj_bright=float(views.brightness),
        cj_contrast=float(views.contrast), cj_sat=0.0, cj_hue=0.0, random_gray_scale=0.0,
        gaussian_blur=float(views.blur_prob), sigmas=(float(views.blur_sigma[0]) * scale, float(views.blur_sigma[1]) * scale),
        hf_prob=float(views.hflip_prob), rr_prob=float(views.rotation_prob), rr_degrees=float(views.rotation),
        normalize={"mean": [mean], "std": [std]},
    )


class Views(Dataset):
    """uint8 (N, 1, S, S) images -> for each, its list of views (float (1, S, S) each); no label."""

    def __init__(self, images: torch.Tensor, transform: Any) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        return self.transform(Image.fromarray(self.images[index, 0].numpy()))  # uint8 (S, S): mode L
