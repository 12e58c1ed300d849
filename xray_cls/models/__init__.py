"""Layer 4, the models: the networks as plain nn.Modules and the LightningModule that trains them.
May import: core, data, metrics.

- `options`: model.* (no torch import);
- `heads`, `networks`, `backbones`: the study's networks, and torchvision's and timm's, by exact name;
- `pretrained`: starting a new run from pretrained weights, and its fine-tuning parameter groups;
- `classifier`: the LightningModule (loss, optimizer, torchmetrics);
- `checkpoints`: reading a checkpoint safely and rebuilding the trained classifier from it.
"""
