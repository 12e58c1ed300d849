"""Grad-CAM (Selvaraju et al., 2017): where in an image the network found its evidence.

The last convolution layer's feature maps are weighted by the mean gradient of the PNEUMONIA
logit (three or more classes: the logit of each image's predicted class) with respect to each of
them; the positive part of the sum, upsampled to the input, is the map. High values mark the
regions that pushed the prediction towards PNEUMONIA (towards the predicted class).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image as PILImage

log = logging.getLogger(__name__)


def last_conv_layer(net: nn.Module) -> nn.Conv2d | None:
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def grad_cam(net: nn.Module, images: Tensor) -> Tensor:
    """Maps in [0, 1] of shape (N, H, W) for preprocessed images (N, C, H, W), in eval mode."""
    layer = last_conv_layer(net)
    if layer is None:
        raise ValueError(f"{type(net).__name__} has no convolution layer for Grad-CAM")
    captured: list[Tensor] = []

    def keep_output(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        captured.append(output)
        return output.clone()  # the in-place ReLU that follows must not overwrite what is kept

    was_training = net.training
    handle = layer.register_forward_hook(keep_output)
    try:
        net.eval()
        with torch.enable_grad():
            images = images.detach().requires_grad_(True)  # a graph even if the weights are frozen
            logits = net(images)
            if logits.dim() == 2:  # K classes: each image's predicted class
                logits = logits.gather(1, logits.argmax(1, keepdim=True))
            (grads,) = torch.autograd.grad(logits.sum(), captured[0])  # images are independent in eval
    finally:
        handle.remove()
        net.train(was_training)
    activations = captured[0].detach()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cams = F.relu((weights * activations).sum(dim=1, keepdim=True))
    cams = F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    peak = cams.flatten(1).max(dim=1).values.clamp(min=1e-12)
    return (cams / peak[:, None, None]).float()


def class_balanced_sample(labels: Tensor, n: int, seed: int, num_classes: int = 2) -> Tensor:
    """Indices of up to n images, an equal share of each class (the last ones take the remainder),
    the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label in range(num_classes):
        members = torch.nonzero(labels == label).flatten()
        share = n // num_classes + (1 if label >= num_classes - n % num_classes else 0)
        picked.append(members[torch.randperm(len(members), generator=generator)[:share]])
    return torch.cat(picked)


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> PILImage.Image:
    """A uint8 grayscale image with the map (any size; resized to the image) in the 'jet' colours."""
    from matplotlib import colormaps
    from PIL import Image

    height, width = gray.shape
    cam_image = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR)
    heat = (colormaps["jet"](np.asarray(cam_image) / 255.0)[..., :3] * 255).astype(np.uint8)
    base = np.stack([gray] * 3, axis=-1)
    return Image.fromarray((base * (1 - alpha) + heat * alpha).round().astype(np.uint8), "RGB")


def sample_figure(images: Tensor, cams: Tensor, probs: Tensor, labels: Tensor, threshold: float,
                  names: Sequence[str]) -> Figure:
    """Overlays of a sample of test images in a grid, each titled with its true class and probability
    (of the positive class; of the predicted class for three or more)."""
    from matplotlib.figure import Figure

    columns = min(4, len(images))
    rows = -(-len(images) // columns)
    fig = Figure(figsize=(2.4 * columns, 2.6 * rows), layout="constrained")
    for i, ax in enumerate(fig.subplots(rows, columns, squeeze=False).flat):
        ax.axis("off")
        if i >= len(images):
            continue
        ax.imshow(overlay(images[i, 0].numpy(), cams[i].numpy()))
        if probs.dim() == 2:
            label = int(probs[i].argmax())
            called, p = names[label], float(probs[i, label])
        else:
            called, p = names[int(probs[i] > threshold)], float(probs[i])
        ax.set_title(f"true {names[int(labels[i])]}\ncalled {called} (p={p:.2f})", fontsize=8)
    fig.suptitle("Grad-CAM, last convolution layer (test sample)", fontsize=9)
    return fig


def gradcam_sample_figure(module: Any, datamodule: Any, samples: int, seed: int) -> dict[str, Figure]:
    """{"gradcam": figure} of a fixed sample of test images, half of each class; {} for a network
    without convolutions (the MLP)."""
    if last_conv_layer(module.net) is None:
        log.info("no Grad-CAM figure: the %s has no convolution layer", type(module.net).__name__)
        return {}
    test = datamodule.splits["test"]
    names = module.hparams.preprocessing["class_names"]
    index = class_balanced_sample(test.labels.cpu(), samples, seed, len(names))
    images, labels = test.images[index.to(test.images.device)].cpu(), test.labels[index.to(test.labels.device)].cpu()
    x = datamodule.preprocess(images.to(module.device))
    cams = grad_cam(module.net, x).cpu()
    probs = module.predict_probabilities(x).cpu()
    return {"gradcam": sample_figure(images, cams, probs, labels, module.threshold, names)}
