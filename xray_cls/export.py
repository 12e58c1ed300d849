"""`python -m xray_cls.export ckpt=... [format=onnx|torchscript]`: a trained model that runs without xray_cls.

Writes model.onnx (ONNX, for onnxruntime and other runtimes) or model.pt (TorchScript, for
`torch.jit.load`) and model.json beside it, to its output folder (`outputs/export/<date>/<time>/`).

The model takes a batch of images as uint8 pixel values 0-255, shape (N, in_channels, size, size),
and returns the probability of PNEUMONIA, float32 of shape (N,) (three or more classes: the
probability of each class, (N, K), in the order of class_names). The checkpoint's normalization
is inside the model. model.json says how to get there from a picture and what to do with the
answer: image_size, in_channels, geometry ("crop": the centred square of the short side, then
resized; "stretch": the whole picture resized), threshold (PNEUMONIA above it) and class_names.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from xray_cls.core.errors import UserInputError
from xray_cls.core.files import atomic_write, write_json
from xray_cls.core.options import choice, number
from xray_cls.runtime.configs import CONFIG_DIR
from xray_cls.runtime.console import checkpoint_command, exit_on_user_error

EXPORT_FORMATS = ("onnx", "torchscript")
MODEL_FILES = dict(zip(EXPORT_FORMATS, ("model.onnx", "model.pt")))
OPTIONS = [choice("format", EXPORT_FORMATS, "known"), number("opset", 7, 30, integer=True)]  # checked before anything is read
SIDECAR = "model.json"
INPUT_NAME, OUTPUT_NAME = "images", "probability"


class ProbabilityModel(nn.Module):
    """uint8 images (N, C, H, W) -> probability of PNEUMONIA (N,), or of each of K classes (N, K),
    normalizing as the run trained."""

    def __init__(self, net: nn.Module, mean: float, std: float, temperature: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))  # the run's calibration

    def forward(self, images: Tensor) -> Tensor:
        from xray_cls.metrics.calibration import probabilities

        x = (images.float() / 255 - self.mean) / self.std  # as xray_cls.data.normalize
        return probabilities(self.net(x), self.temperature)


def export(cfg: DictConfig) -> Path:
    """Export `cfg.ckpt` as `cfg.format`; returns the model file's path."""
    from xray_cls.models.checkpoints import load_classifier

    with checkpoint_command(cfg, OPTIONS, [SIDECAR], "an exported model") as out_dir:
        module = load_classifier(cfg.ckpt)
        model_path = write_model(module, cfg.format, cfg.opset, out_dir / MODEL_FILES[cfg.format])
        write_json(out_dir / SIDECAR, sidecar(module, model_path, cfg))
    print(f"exported {cfg.ckpt} as {cfg.format}: {model_path} (with {SIDECAR})", flush=True)
    return model_path


def write_model(module: Any, kind: str, opset: int, model_path: Path) -> Path:
    """The classifier as a ProbabilityModel, traced into `model_path` (ONNX or TorchScript)."""
    prep = module.hparams.preprocessing
    model = ProbabilityModel(module.net, prep["mean"], prep["std"], module.temperature).eval()
    example = torch.zeros(2, prep["in_channels"], prep["image_size"], prep["image_size"], dtype=torch.uint8)
    with atomic_write(model_path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' notes on tracing and their own deprecations
        if kind == "onnx":
            write_onnx(model, example, tmp, opset)
        else:
            torch.jit.save(torch.jit.trace(model, example), str(tmp))
    return model_path


def sidecar(module: Any, model_path: Path, cfg: DictConfig) -> dict[str, Any]:
    """model.json: what a user needs besides the model, from a picture to a decision."""
    from xray_cls.data import trained_geometry
    from xray_cls.models.untrusted_files import network_name

    prep, choices = module.hparams.preprocessing, module.choices
    return {
        "model": model_path.name,
        "format": cfg.format,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "range": [0, 255],
                  "shape": ["batch", prep["in_channels"], prep["image_size"], prep["image_size"]]},
        "output": output_record(prep["class_names"]),
        "image_size": prep["image_size"],
        "in_channels": prep["in_channels"],
        "geometry": trained_geometry(prep, cfg.ckpt),
        **decision_record(module),
        "class_names": list(prep["class_names"]),
        "normalization": {"mean": prep["mean"], "std": prep["std"], "note": "applied inside the model"},
        "temperature": {"value": choices.temperature, "note": "applied inside the model (1: uncalibrated)"},
        "network": network_name(module.hparams.net),
        "checkpoint": str(cfg.ckpt),
    }


def output_record(names: list[str]) -> dict[str, Any]:
    if len(names) == 2:
        return {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch"], "meaning": f"probability of {names[1]}"}
    return {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(names)],
            "meaning": f"probability of each class, in the order of class_names ({', '.join(names)})"}


def decision_record(module: Any) -> dict[str, Any]:
    """How to turn the output into a class: above the threshold, or the most probable class."""
    if not module.binary:
        from xray_cls.reports.test_report import ARGMAX

        return {"decision": ARGMAX}
    return {"threshold": module.choices.threshold, "threshold_rule": module.choices.rule_record()}


def write_onnx(model: nn.Module, example: Tensor, path: Path, opset: int) -> None:
    """The TorchScript-based exporter: it needs only `onnx`, and handles these plain networks."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise UserInputError("format=onnx needs the onnx package; pip install 'xray_cls[export]' (or use format=torchscript)")
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=opset,
    )


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> Any:
    return exit_on_user_error(lambda: export(cfg))


if __name__ == "__main__":
    main()
