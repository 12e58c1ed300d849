"""The self-supervised methods (`ssl=`), each a backbone's features, lightly's heads and loss.

- SimCLR (Chen et al., 2020): two views of an image are pulled together and every other image
  of the batch pushed away (NT-Xent over a projection head);
- BYOL (Grill et al., 2020): an online network predicts the projection a momentum copy of itself
  gives of the other view; no negatives, so it needs no large batch.

Each method takes the backbone (`models.features.Features`) and says its loss for a batch of
views; `after_step` is what follows an optimizer step (BYOL's momentum update).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module, width: int, hidden_dim: int = 512, projection_dim: int = 128,
                 temperature: float = 0.1) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone = backbone
        self.projection = SimCLRProjectionHead(width, hidden_dim, projection_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)

    def forward(self, views: list[Tensor]) -> Tensor:
        first, second = (self.projection(self.backbone(v)) for v in views[:2])
        return self.criterion(first, second)

    def after_step(self, step: int, steps: int) -> None:
        pass


class BYOL(nn.Module):
    def __init__(self, backbone: nn.Module, width: int, hidden_dim: int = 512, projection_dim: int = 128,
                 momentum: float = 0.99) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = backbone
        self.projection = BYOLProjectionHead(width, hidden_dim, projection_dim)
        self.prediction = BYOLPredictionHead(projection_dim, hidden_dim, projection_dim)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_momentum = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_momentum)
        self.momentum = momentum
        self.criterion = NegativeCosineSimilarity()

    def target(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.projection_momentum(self.backbone_momentum(x)).detach()

    def forward(self, views: list[Tensor]) -> Tensor:
        first, second = views[:2]
        online = [self.prediction(self.projection(self.backbone(v))) for v in (first, second)]
        return 0.5 * (self.criterion(online[0], self.target(second)) + self.criterion(online[1], self.target(first)))

    def after_step(self, step: int, steps: int) -> None:
        """The momentum copies follow the online network, the momentum rising to 1 on a cosine (lightly's schedule)."""
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        momentum = cosine_schedule(step, max(steps, 1), self.momentum, 1.0)
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection, self.projection_momentum, m=momentum)
