"""Grad-CAM points at the evidence: a CNN taught that a bright patch means PNEUMONIA looks at the patch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xray_cls.models.networks import CNN, MLP
from xray_cls.reports.gradcam import class_balanced_sample, grad_cam

from test_train import load_events

SIZE, PATCH = 28, 6


def patch_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images; the positive half has a bright patch at a random place. Returns images, labels, patch masks."""
    images = torch.rand(n, 1, SIZE, SIZE, generator=generator) * 0.5
    labels = torch.arange(n) % 2
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    corners = torch.randint(0, SIZE - PATCH, (n, 2), generator=generator)
    for i in torch.nonzero(labels).flatten():
        row, col = corners[i].tolist()
        images[i, 0, row : row + PATCH, col : col + PATCH] += 0.5
        masks[i, row : row + PATCH, col : col + PATCH] = True
    return images, labels, masks


@pytest.fixture(scope="module")
def patch_detector() -> CNN:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    net = CNN(in_channels=1, image_size=SIZE, channels=(8, 16), hidden=(32,), dropout=0.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(150):
        images, labels, _ = patch_images(64, generator)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(images), labels.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net


def test_the_map_is_brightest_on_the_evidence(patch_detector: CNN) -> None:
    images, labels, masks = patch_images(64, torch.Generator().manual_seed(1))
    accuracy = ((patch_detector(images) > 0) == labels.bool()).float().mean()
    assert accuracy > 0.95  # the network has learnt the task
    cams = grad_cam(patch_detector, images)
    positive = labels.bool()
    inside = (cams[positive] * masks[positive]).sum((1, 2)) / masks[positive].sum((1, 2))
    outside = (cams[positive] * ~masks[positive]).sum((1, 2)) / (~masks[positive]).sum((1, 2))
    assert (inside > 2 * outside).float().mean() > 0.9


def test_maps_are_normalized_and_leave_the_network_as_it_was(patch_detector: CNN) -> None:
    images, _, _ = patch_images(8, torch.Generator().manual_seed(2))
    patch_detector.train()
    patch_detector.zero_grad(set_to_none=True)
    cams = grad_cam(patch_detector, images)
    assert cams.shape == (8, SIZE, SIZE)
    peaks = cams.flatten(1).max(1).values
    assert cams.min() >= 0 and torch.allclose(peaks[peaks > 0], torch.tensor(1.0))
    assert patch_detector.training
    assert all(p.grad is None for p in patch_detector.parameters())


def test_a_network_without_convolutions_has_no_map() -> None:
    with pytest.raises(ValueError, match="MLP has no convolution layer"):
        grad_cam(MLP(in_channels=1, image_size=SIZE), torch.zeros(2, 1, SIZE, SIZE))


def test_sample_is_balanced_and_repeatable() -> None:
    labels = torch.tensor([0] * 30 + [1] * 70)
    sample = class_balanced_sample(labels, 8, seed=3)
    assert labels[sample].tolist() == [0] * 4 + [1] * 4
    assert torch.equal(sample, class_balanced_sample(labels, 8, seed=3))


def test_a_cnn_run_logs_gradcam_overlays(cnn_run: Path) -> None:
    assert (cnn_run / "figures" / "gradcam.png").is_file()
    assert "test/gradcam" in load_events(cnn_run).Tags()["images"]
    assert json.loads((cnn_run / "metrics.json").read_text())["hparams"]["model"] == "cnn"
