"""The LightningModule of a pretraining: a network's backbone learning from unlabeled views.

The network is built from `model` as a classifier's would be, and its output layer taken out
(`models.features.Features`); the method (`method=`) adds its heads and loss. Where the data has a
labeled val split, every validation measures the usual monitor of such runs: a k-nearest-neighbour
classifier (lightly's `knn_predict`, cosine similarity) of val's features among train's, labels
used there and nowhere else (`knn_acc/val`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor

from xray_cls.core.errors import UserInputError
from xray_cls.data.splits import normalize
from xray_cls.models.features import Features
from xray_cls.models.networks import build_network

KNN_CHUNK = 1024  # val images compared with the bank at once
EXPECTED = "a .ckpt file written by python -m xray_cls.pretrain (outputs/pretrain/<run>/checkpoints/last.ckpt)"


class SelfSupervised(L.LightningModule):
    def __init__(self, net: dict[str, Any], method: dict[str, Any], optimizer: dict[str, Any], scheduler: dict[str, Any] | None,
                 preprocessing: dict[str, Any], num_classes: int = 2, knn_k: int = 20, knn_temperature: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = Features(build_network(net))
        self.method = instantiate(method, backbone=self.features, width=self.features.width)
        self.knn_parts: list[list[tuple[Tensor, Tensor]]] = [[], []]  # train's (the bank) and val's features, labels

    def training_step(self, views: list[Tensor], batch_idx: int) -> Tensor:
        # The momentum copies follow the steps done so far (lightly's order): a checkpoint taken
        # after any step holds them as a run that goes on would have them.
        self.method.after_step(self.global_step, int(self.trainer.estimated_stepping_batches))
        loss = self.method(views)
        self.log("loss/pretrain", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(views[0]))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        prep = self.hparams.preprocessing
        features = F.normalize(self.features(normalize(images, prep["mean"], prep["std"])), dim=1)
        self.knn_parts[dataloader_idx].append((features, labels))

    def on_validation_epoch_end(self) -> None:
        bank, queries = ([torch.cat(t) for t in zip(*part)] if part else None for part in self.knn_parts)
        self.knn_parts = [[], []]
        if bank is None or queries is None:
            return
        from lightly.utils.benchmarking import knn_predict

        bank_features, bank_labels = (self.all_gather(t).flatten(0, -2 if t.dim() > 1 else -1) for t in bank)
        bank_t, k = bank_features.T.contiguous(), min(self.hparams.knn_k, len(bank_labels))
        correct = torch.zeros((), device=bank_t.device)
        for start in range(0, len(queries[1]), KNN_CHUNK):  # a chunk's similarities to the bank at a time, not all of val's
            chunk = slice(start, start + KNN_CHUNK)
            predicted = knn_predict(queries[0][chunk], bank_t, bank_labels, self.hparams.num_classes, k, self.hparams.knn_temperature)
            correct += (predicted[:, 0] == queries[1][chunk]).float().sum()
        total = torch.tensor(float(len(queries[1])), device=correct.device)
        self.log("knn_acc/val", self.all_gather(correct).sum() / self.all_gather(total).sum(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer)(p for p in self.parameters() if p.requires_grad)
        if not self.hparams.scheduler:
            return optimizer
        scheduler_cfg = dict(self.hparams.scheduler)
        interval = scheduler_cfg.pop("interval", "epoch")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": instantiate(scheduler_cfg)(optimizer), "interval": interval}}


def read_pretraining_checkpoint(path: str | Path, option: str = "ckpt_path") -> dict[str, Any]:
    """A pretraining's checkpoint, read as untrusted as any (`models.untrusted_files`): plain
    tensors and values, its network named exactly and its backbone's tensors those the network has."""
    from xray_cls.models.untrusted_files import check_state_dict, load_plain, network_problem

    checkpoint = load_plain(path, option, EXPECTED)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("net"), dict) or "method" not in hparams \
            or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserInputError(f"{option}={path} is not a checkpoint of a pretraining; expected {EXPECTED}")
    problem = network_problem(hparams["net"])
    if problem:
        raise UserInputError(f"{option}={path} is not a pretraining checkpoint that can be trusted: {problem}; expected {EXPECTED}")
    check_state_dict(hparams["net"], checkpoint["state_dict"], f"{option}={path}", prefix="features.net.", backbone=True)
    state = checkpoint["state_dict"]  # the heads', the momentum copies' and every alias of the backbone too
    broken = next((k for k, v in state.items() if not isinstance(v, torch.Tensor) or (v.is_floating_point() and not torch.isfinite(v).all())), None)
    if broken is not None:
        raise UserInputError(f"{option}={path} holds {str(broken)[:100]}, which is not a tensor of finite numbers; expected {EXPECTED}")
    return checkpoint
