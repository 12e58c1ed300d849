"""Fine-tuning a pretrained backbone: kept frozen (batch norm too) for its first epochs."""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import nn

from xray_cls.core.errors import UserInputError
from xray_cls.models.features import backbone_parameters

log = logging.getLogger(__name__)


class FreezeBackbone(Callback):
    """The backbone frozen for the first `epochs` epochs: no gradients (the optimizer skips
    parameters without one) and its batch norm in eval mode (statistics fixed), set again before
    every batch, since Lightning may put modules back in train mode after a validation.

    Lightning's BackboneFinetuning is not used: it freezes batch norm by switching its running
    statistics off, so a frozen epoch's validation would normalize by batch statistics, and it adds
    the backbone to the optimizer only when it thaws, which a resumed run must then replay."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.norms: list[nn.Module] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        backbone = set(map(id, backbone_parameters(pl_module.net)))
        self.norms = [m for m in pl_module.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      and all(id(p) in backbone for p in m.parameters())]

    def frozen(self, trainer: Any) -> bool:
        return trainer.current_epoch < self.epochs

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        frozen = self.frozen(trainer)
        for param in backbone_parameters(pl_module.net):
            param.requires_grad_(not frozen)
        for norm in self.norms:
            norm.train(not frozen)
        if trainer.current_epoch == self.epochs:
            log.info("epoch %d: the backbone is trained from now on", trainer.current_epoch)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.frozen(trainer):
            for norm in self.norms:
                norm.eval()


def check_fine_tuning(cfg: DictConfig, pretraining: Any, net: Any) -> None:
    """Freezing the backbone (every layer but the output layer) under DDP needs DDP to expect parameters without gradients."""
    if pretraining.fine_tuning is None:
        return
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if pretraining.freeze_epochs and strategy.startswith("ddp") and "find_unused_parameters_true" not in strategy:
        raise UserInputError(f"model.freeze_epochs={pretraining.freeze_epochs} with trainer.strategy={strategy}: DDP waits for the "
                             "frozen parameters' gradients; expected trainer.strategy=ddp_find_unused_parameters_true")
