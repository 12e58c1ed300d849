"""Layer 6, pretraining: a network's backbone learned from unlabeled X-rays (self-supervised, with lightly).
May import: core, runtime, data, metrics, models, training.

- `options`: the pretrain.*, views.* and ssl.* options (no torch import);
- `sources`: the images pretrained on, from the run's data and `pretrain.sources`, labels never read;
- `views`: the two random views of each image, set for gray chest X-rays;
- `methods`: SimCLR and BYOL, lightly's heads, losses and momentum updates around the backbone;
- `module`: the LightningModule that fits them, with its kNN monitor, and its checkpoint's reader.

What it writes, backbone.pth, is read by `models.backbone_files` (`model.weights=`).
"""
