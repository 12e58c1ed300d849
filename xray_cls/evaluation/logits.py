"""A model's logits on a split of its data, batch by batch: what the val choices, recalibration and
the site protocol are made on."""

from __future__ import annotations

from typing import Any

import torch

from xray_cls.core.memory import return_freed_memory


def val_predictions(module: Any, datamodule: Any, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    """The module's logits (before any temperature) and the labels of the val split (or `split`),
    batch by batch: a large split is never copied whole, let alone as float."""
    val = datamodule.splits[split]
    logits = []
    for images in val.batches(datamodule.batch_size):
        logits.append(module.predict_logits(datamodule.preprocess(images.to(module.device))).cpu())
        return_freed_memory()  # else each batch's freed activations pile up in the threads' arenas
    return torch.cat(logits), val.labels.cpu()
