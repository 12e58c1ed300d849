"""Calibration: the ECE and reliability diagram of every run, and temperature scaling fitted on val."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torchmetrics.classification import BinaryCalibrationError

from xray_cls.core.errors import UserInputError
from xray_cls.data import PneumoniaMNISTDataModule, normalize
from xray_cls.evaluate import evaluate
from xray_cls.metrics.calibration import CALIBRATION_BINS, calibration_error, fit_temperature, reliability_bins
from xray_cls.metrics.thresholds import choose_threshold
from xray_cls.models.checkpoints import load_classifier, read_checkpoint
from xray_cls.predict import predict
from xray_cls.train import train

from conftest import SHORT_RUN, compose_config, run_cli
from test_train import load_events


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("calibrated_run")
    train(compose_config(run_dir, ["model=mlp", "calibration=temperature", "threshold_rule=youden", *SHORT_RUN]))
    return run_dir


def split_logits(module, name: str) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    data = PneumoniaMNISTDataModule()
    data.setup()
    prep, split = module.hparams.preprocessing, data.splits[name]
    return module.predict_logits(normalize(split.images, prep["mean"], prep["std"])), split.labels


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_temperature_scaling_undoes_a_scaled_logit(scale: float) -> None:
    """Labels drawn from sigmoid(z) and logits scale * z: the fitted temperature is about `scale`."""
    generator = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(20000, generator=generator)
    labels = torch.bernoulli(torch.sigmoid(z), generator=generator).long()
    temperature = fit_temperature(scale * z, labels)
    assert temperature == pytest.approx(scale, rel=0.05)
    assert calibration_error(torch.sigmoid(scale * z / temperature), labels) < 0.02


def test_ece_is_the_weighted_gap_of_the_reliability_bins() -> None:
    generator = torch.Generator().manual_seed(1)
    probs, labels = torch.rand(1000, generator=generator) * 0.999, torch.randint(0, 2, (1000,), generator=generator)
    bins = reliability_bins(probs, labels)
    assert len(bins["count"]) == CALIBRATION_BINS and sum(bins["count"]) == 1000
    gap = sum(n * abs(m - f) for n, m, f in zip(bins["count"], bins["mean_probability"], bins["fraction_positive"]) if n)
    assert calibration_error(probs, labels) == pytest.approx(gap / 1000, abs=1e-5)
    assert calibration_error(probs, labels) == pytest.approx(BinaryCalibrationError(n_bins=15)(probs, labels).item(), abs=1e-6)


def test_a_run_fits_its_temperature_on_val_then_its_threshold(calibrated_run: Path) -> None:
    metrics = json.loads((calibrated_run / "metrics.json").read_text())
    calibration, temperature = metrics["calibration"], metrics["calibration"]["temperature"]
    for name in ("best.ckpt", "last.ckpt"):  # predict and evaluate apply it, with either checkpoint
        assert read_checkpoint(calibrated_run / "checkpoints" / name)["hyper_parameters"]["temperature"] == temperature
    module = load_classifier(calibrated_run / "checkpoints" / "best.ckpt")
    assert module.temperature == temperature != 1.0
    val_logits, val_labels = split_logits(module, "val")
    assert fit_temperature(val_logits, val_labels) == pytest.approx(temperature, rel=1e-6)
    calibrated = torch.sigmoid(val_logits / temperature)
    assert choose_threshold("youden", calibrated, val_labels, 0.5, 0.95) == pytest.approx(metrics["threshold_rule"])
    assert calibration["val_ece"] == pytest.approx(calibration_error(calibrated, val_labels), abs=1e-6)
    assert calibration["val_ece_uncalibrated"] == pytest.approx(calibration_error(torch.sigmoid(val_logits), val_labels), abs=1e-6)
    test_logits, test_labels = split_logits(module, "test")
    assert calibration["test_ece"] == pytest.approx(calibration_error(torch.sigmoid(test_logits / temperature), test_labels), abs=1e-6)
    assert calibration["test_ece_uncalibrated"] == pytest.approx(calibration_error(torch.sigmoid(test_logits), test_labels), abs=1e-6)
    assert [sum(calibration["reliability"][s]["count"]) for s in ("test", "val")] == [624, 524]
    assert metrics["hparams"]["calibration"] == "temperature"


def test_every_run_reports_ece_and_a_reliability_diagram(cnn_run: Path) -> None:
    metrics = json.loads((cnn_run / "metrics.json").read_text())
    calibration = metrics["calibration"]
    assert calibration["temperature"] == 1.0 and "test_ece_uncalibrated" not in calibration
    assert 0 <= calibration["test_ece"] <= 1 and 0 <= calibration["val_ece"] <= 1
    assert (cnn_run / "figures" / "reliability_diagram.png").read_bytes()[:4] == b"\x89PNG"
    events = load_events(cnn_run)
    assert "test/reliability_diagram" in events.Tags()["images"]
    assert events.Scalars("calibration/test_ece")[-1].value == pytest.approx(calibration["test_ece"])


def test_evaluate_and_predict_output_calibrated_probabilities(calibrated_run: Path, kermany_root: Path, tmp_path: Path) -> None:
    run = json.loads((calibrated_run / "metrics.json").read_text())
    ckpt = calibrated_run / "checkpoints" / "best.ckpt"
    metrics = evaluate(compose_config(tmp_path / "evaluate", [f"ckpt={ckpt}", "gradcam_samples=0"], name="evaluate"))
    assert metrics["confusion_matrix"] == run["confusion_matrix"]
    assert metrics["test"] == pytest.approx(run["test"], abs=1e-6)
    assert metrics["calibration"]["test_ece"] == pytest.approx(run["calibration"]["test_ece"], abs=1e-6)
    assert (tmp_path / "evaluate" / "figures" / "reliability_diagram.png").is_file()

    csv_path = predict(compose_config(tmp_path / "predict", [f"ckpt={ckpt}", f"input={kermany_root / 'test'}"], name="predict"))
    rows = list(csv.DictReader(csv_path.open()))
    module = load_classifier(ckpt)
    module.temperature = 1.0  # the raw logits, to scale by the run's temperature below
    from xray_cls.data.inputs import find_inputs, read_chunk

    found = find_inputs(kermany_root / "test")
    prep = module.hparams.preprocessing
    paths, images = read_chunk(found.images, prep["image_size"], prep["geometry"], found)
    raw = module.predict_logits(normalize(images, prep["mean"], prep["std"]))
    expected = torch.sigmoid(raw / run["calibration"]["temperature"])
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert [float(r["probability_pneumonia"]) for r in rows] == pytest.approx(expected.tolist(), abs=2e-6)
    assert expected.tolist() != pytest.approx(torch.sigmoid(raw).tolist(), abs=1e-3)  # the temperature did matter


def test_an_unknown_calibration_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="calibration='platt' is not known; expected one of none, temperature"):
        train(compose_config(tmp_path, ["calibration=platt", *SHORT_RUN]))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("value,expected", [(-2.0, "temperature is -2.0, not a positive number"),
                                            ("hot", "temperature is a str, not a positive number")])
def test_a_crafted_temperature_is_refused(value: object, expected: str, calibrated_run: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(calibrated_run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["temperature"] = value
    torch.save(checkpoint, tmp_path / "model.ckpt")
    result = run_cli([f"ckpt={tmp_path / 'model.ckpt'}", f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path, module="xray_cls.evaluate")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: ckpt={tmp_path / 'model.ckpt'} is not an xray_cls checkpoint that can be trusted: "
                                     f"{expected}; expected a .ckpt file written by an xray_cls run "
                                     "(outputs/<run>/checkpoints/best.ckpt or last.ckpt)")
    assert not (tmp_path / "out" / "metrics.json").exists()
