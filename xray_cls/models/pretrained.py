"""Starting a new run from pretrained weights, and fine-tuning them.

`model.weights` is null (from scratch), a torchvision weights name (`DEFAULT`, `IMAGENET1K_V1`;
model=timm: `pretrained`), the path of a local `.pth` state dict, or the backbone.pth of a
self-supervised pretraining (`python -m xray_cls.pretrain`, `backbone_files`), which fits any
network, the study's too, pretrained as the run builds it. torchvision's weights come
from its own cache (`$TORCH_HOME/hub/checkpoints/`, `~/.cache/torch/hub/checkpoints/` by default)
through torchvision's own loading code, and are downloaded there only when missing and
`model.download=true`; timm's from the Hugging Face cache likewise. A file that is neither there
nor downloadable is one line naming it, where it comes from and where to put it.

Weights are loaded here only, into a new run's network: never when a checkpoint is loaded
(predict, evaluate, export, resume), whose own state dict fills the architecture.

Fine-tuning: `model.backbone_lr_scale` trains the backbone (every parameter but the head) at that
fraction of the head's learning rate (`parameter_groups`); `model.freeze_epochs` keeps it frozen
for the first epochs (training.fine_tuning.FreezeBackbone).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xray_cls.core.errors import UserInputError
from xray_cls.core.options import check_bool, check_number

log = logging.getLogger(__name__)


# ImageNet's per-channel statistics, averaged for one channel: a gray image fed to the summed RGB
# filters must be scaled as each RGB channel was.
IMAGENET_GRAY = (0.449, 0.226)
PRETRAINING_KEYS = ("weights", "download", "freeze_epochs", "backbone_lr_scale")  # model.* that are not network arguments


@dataclass(frozen=True)
class Pretraining:
    weights: str | None = None
    download: bool = True
    freeze_epochs: int = 0
    backbone_lr_scale: float = 1.0

    @classmethod
    def pop_from(cls, net_cfg: dict[str, Any]) -> Pretraining:
        """The pretraining options of a model config, taken out of it: the rest are the network's arguments."""
        found = {key: net_cfg.pop(key) for key in PRETRAINING_KEYS if key in net_cfg}
        made = cls(**found)
        if made.weights is not None and not isinstance(made.weights, str):
            raise UserInputError(f"model.weights={made.weights!r} is not valid; expected null, a weights name or a .pth path")
        check_bool("model.download", made.download)
        check_number("model.freeze_epochs", made.freeze_epochs, 0, integer=True)
        check_number("model.backbone_lr_scale", made.backbone_lr_scale, 0, 1)
        return made

    @property
    def fine_tuning(self) -> dict[str, Any] | None:
        """What the classifier needs when it trains (None: every parameter alike)."""
        if not self.freeze_epochs and self.backbone_lr_scale == 1.0:
            return None
        return {"freeze_epochs": self.freeze_epochs, "backbone_lr_scale": float(self.backbone_lr_scale)}


def pretrained_backbone(pretraining: Pretraining, net_cfg: dict[str, Any], image_size: int, in_channels: int) -> Any:
    """The backbone file `model.weights` names, checked to fit the run's network and images; None
    when model.weights is null, a weights name or another kind of state dict."""
    from xray_cls.models.backbone_files import check_fits, read_backbone_file

    weights = pretraining.weights
    if weights is None or not is_path(weights) or not Path(weights).expanduser().is_file():
        return None
    found = read_backbone_file(Path(weights).expanduser(), "model.weights")
    if found is not None:
        check_fits(found, net_cfg, image_size, in_channels, f"model.weights={weights}")
        log.info("model.weights: a backbone pretrained by %s for %s epochs on %s image(s) (sha256 of their list %s)",
                 found.provenance.get("method"), found.provenance.get("epochs", 0), found.provenance.get("images"),
                 str(found.provenance.get("files_sha256"))[:12])
    return found


def load_weights(net: nn.Module, pretraining: Pretraining, backbone: Any = None) -> str:
    """`pretraining.weights` into a new run's network (`backbone`: the file pretrained_backbone
    read); returns the normalization that fits them: `pretraining` for a backbone file,
    `imagenet` for other pretrained weights, `train` (the train split's statistics) from scratch."""
    from xray_cls.models.backbone_files import load_backbone
    from xray_cls.models.backbones import TimmNet, TorchvisionNet

    weights = pretraining.weights
    if weights is None:
        return "train"
    if backbone is not None:
        load_backbone(net, backbone)
        log.info("pretrained backbone %s loaded into %s (its output layer new)", weights, type(net).__name__)
        return "pretraining"
    if isinstance(net, TorchvisionNet):
        net.load_pretrained(torchvision_state(net.name, weights, pretraining.download), f"model.weights={weights}")
    elif isinstance(net, TimmNet):
        load_timm(net, weights, pretraining.download)
    else:
        raise UserInputError(f"model.weights={weights}: the {type(net).__name__} has no pretrained weights of that name; expected "
                             "the backbone.pth of python -m xray_cls.pretrain, or model=torchvision, model=timm or one of "
                             "their configs (model=resnet18, model=densenet121, ...)")
    log.info("pretrained weights %s loaded into %s (%s)", weights, net.name, type(net).__name__)
    return "imagenet"


def is_path(weights: str) -> bool:
    return weights.endswith((".pth", ".pt", ".bin", ".safetensors")) or "/" in weights


def read_state_dict(path: Path, option: str) -> dict[str, torch.Tensor]:
    """A local state dict, read as tensors only (weights_only: it never runs code)."""
    if not path.is_file():
        raise UserInputError(f"{option}: {path} does not exist; expected a .pth state dict of this network")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  a file from outside: any failure means "not a state dict"
        raise UserInputError(f"{option}: {path} is not a readable state dict ({str(err).splitlines()[0][:150]})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserInputError(f"{option}: {path} is not a state dict (a mapping of names to tensors)")
    return state


def torchvision_state(name: str, weights: str, download: bool) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of torchvision's `name`: from a local file, or built by torchvision's
    own loading code (its key fix-ups included) from its cache."""
    import torchvision

    option = f"model.weights={weights}"
    if is_path(weights):
        twin = torchvision.models.get_model(name, weights=None, **builder_arguments(name))
        from xray_cls.models.backbones import load_matching

        load_matching(twin, read_state_dict(Path(weights).expanduser(), option), [], f"{option}")
        return twin.state_dict()
    enum = torchvision.models.get_model_weights(name)
    if weights not in enum.__members__:
        raise UserInputError(f"{option} is not a weights name of {name}; expected one of {', '.join(enum.__members__)}")
    chosen = enum[weights]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(chosen.url).name
    if not cached.is_file() and not download:
        raise missing_weights(option, cached, chosen.url, "model.download=false")
    try:
        twin = torchvision.models.get_model(name, weights=chosen, **builder_arguments(name))
    except (OSError, RuntimeError) as err:  # URLError is an OSError: no network, a proxy, a partial file
        raise missing_weights(option, cached, chosen.url, str(err).splitlines()[0][:120]) from None
    return twin.state_dict()


def builder_arguments(name: str) -> dict[str, Any]:
    from xray_cls.models.backbones import BUILDER_ARGUMENTS

    return {k: v for k, v in BUILDER_ARGUMENTS.get(name, {}).items() if k != "aux_logits"}


def missing_weights(option: str, cached: Path, url: str, why: str) -> UserInputError:
    return UserInputError(
        f"{option}: {cached.name} is not in the cache {cached.parent} and could not be downloaded ({why}); on a machine "
        f"with internet, download {url} and copy it to {cached.parent} (or set TORCH_HOME), or give model.weights=<a local .pth>"
    )


def load_timm(net: nn.Module, weights: str, download: bool) -> None:
    """timm's pretrained weights (timm adapts the stem to one channel and drops the head) into `net`."""
    import timm

    option = f"model.weights={weights}"
    overlay: dict[str, Any] = {}
    if is_path(weights):
        path = Path(weights).expanduser()
        read_state_dict(path, option)  # checked as tensors only before timm reads it
        overlay = {"file": str(path)}
    elif weights != "pretrained":
        raise UserInputError(f"{option} is not valid for model=timm; expected null, pretrained or a local weights file")
    else:
        cached = timm_cached_file(net.name)
        if cached is None and not download:
            raise UserInputError(
                f"{option}: timm's weights of {net.name} are not in the Hugging Face cache and model.download=false; on a "
                f"machine with internet run python -c \"import timm; timm.create_model('{net.name}', pretrained=True)\" and "
                "copy ~/.cache/huggingface to this machine (or set HF_HOME), or give model.weights=<a local file>"
            )
        if cached is not None:
            overlay = {"file": cached}
    try:
        twin = timm.create_model(net.name, pretrained=True, in_chans=net.in_channels, pretrained_cfg_overlay=overlay,
                                 num_classes=net.model.get_classifier().out_features)
    except Exception as err:  # noqa: BLE001  the hub's and the file's failures are many; each is one line
        raise UserInputError(f"{option}: timm could not load the weights of {net.name} ({str(err).splitlines()[0][:150]})") from None
    from xray_cls.models.backbones import load_matching

    classifier = net.model.default_cfg.get("classifier", "fc")
    head = {k for k in net.model.state_dict() if k.startswith(f"{classifier}.")}  # the new head keeps its own init
    state = {k: v for k, v in twin.state_dict().items() if k not in head}
    load_matching(net.model, state, sorted(head), option)


def timm_cached_file(name: str) -> str | None:
    """The weights file of timm's `name` in the Hugging Face cache, or None."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return found
    return None


def parameter_groups(module: nn.Module, fine_tuning: dict[str, Any] | None, lr: float) -> Any:
    """The optimizer's parameters: all alike, or the head at `lr` and the backbone at lr x backbone_lr_scale."""
    from xray_cls.models.features import backbone_parameters

    if not fine_tuning:
        return module.parameters()
    backbone = backbone_parameters(module.net)
    ids = set(map(id, backbone))
    head = [p for p in module.parameters() if id(p) not in ids]
    scale = fine_tuning["backbone_lr_scale"]
    if not math.isfinite(lr):  # an optimizer without lr: its own default for both
        return [{"params": head}, {"params": backbone}]
    return [{"params": head}, {"params": backbone, "lr": lr * scale}]
