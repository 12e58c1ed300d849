"""Ensembles (ckpt=[a,b]) and test-time augmentation (tta=true) in evaluate and predict."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from xray_cls.data import PneumoniaMNISTDataModule, normalize
from xray_cls.evaluate import evaluate
from xray_cls.evaluation.ensemble import shifted_views
from xray_cls.metrics.thresholds import choose_threshold
from xray_cls.models.checkpoints import load_classifier
from xray_cls.predict import predict

from conftest import compose_config, run_cli


def bundled_probs(ckpt: Path, split: str, tta: bool = False) -> torch.Tensor:
    """One checkpoint's calibrated probabilities on a bundled split, over the TTA views if asked."""
    module = load_classifier(ckpt)
    prep = module.hparams.preprocessing
    data = PneumoniaMNISTDataModule()
    data.setup()
    images = normalize(data.splits[split].images, prep["mean"], prep["std"])
    views = shifted_views(images) if tta else [images]
    return torch.stack([module.predict_probabilities(v).double() for v in views]).mean(0)


def bundled_labels(split: str) -> torch.Tensor:
    data = PneumoniaMNISTDataModule()
    data.setup()
    return data.splits[split].labels


def confusion(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> list[list[int]]:
    called, positive = probs > threshold, labels.bool()
    return [[int((~called & ~positive).sum()), int((called & ~positive).sum())],
            [int((~called & positive).sum()), int((called & positive).sum())]]


def test_shifted_views_move_the_image_by_one_pixel_at_28px() -> None:
    images = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    views = shifted_views(images)
    assert len(views) == 5 and all(v.shape == images.shape for v in views)
    assert torch.equal(views[0], images)
    assert torch.equal(views[1][..., 1:, :], images[..., :-1, :])  # content moved down by one row
    assert torch.equal(views[1][..., 0, :], images[..., 0, :])  # the edge row repeated
    assert torch.equal(views[4][..., :, :-1], images[..., :, 1:])


def test_an_ensemble_averages_probabilities_and_chooses_its_threshold_on_val(cnn_run: Path, mlp_run: Path,
                                                                            tmp_path: Path) -> None:
    ckpts = [cnn_run / "checkpoints" / "best.ckpt", mlp_run / "checkpoints" / "best.ckpt"]
    metrics = evaluate(compose_config(tmp_path, [f"ckpt=[{ckpts[0]},{ckpts[1]}]", "bootstrap.resamples=0"], name="evaluate"))
    val = torch.stack([bundled_probs(c, "val") for c in ckpts]).mean(0)
    expected = choose_threshold("youden", val, bundled_labels("val"), 0.5, 0.95)  # cnn_run's rule, the first's
    assert metrics["threshold_rule"] == pytest.approx(expected, abs=1e-6)
    test = torch.stack([bundled_probs(c, "test") for c in ckpts]).mean(0)
    assert metrics["confusion_matrix"]["matrix"] == confusion(test, bundled_labels("test"), metrics["threshold"])
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 624
    assert metrics["ensemble"] == {"checkpoints": [str(c) for c in ckpts], "tta": False, "tta_views": 1}
    assert (tmp_path / "figures" / "reliability_diagram.png").is_file()
    assert not (tmp_path / "figures" / "gradcam.png").exists()  # Grad-CAM explains one network


def test_tta_averages_over_shifted_views_in_evaluate_and_predict(cnn_run: Path, kermany_root: Path, tmp_path: Path) -> None:
    ckpt = cnn_run / "checkpoints" / "best.ckpt"
    metrics = evaluate(compose_config(tmp_path / "evaluate", [f"ckpt={ckpt}", "tta=true", "bootstrap.resamples=0"],
                                      name="evaluate"))
    expected = choose_threshold("youden", bundled_probs(ckpt, "val", tta=True), bundled_labels("val"), 0.5, 0.95)
    assert metrics["threshold_rule"] == pytest.approx(expected, abs=1e-6)
    test = bundled_probs(ckpt, "test", tta=True)
    assert metrics["confusion_matrix"]["matrix"] == confusion(test, bundled_labels("test"), metrics["threshold"])
    assert metrics["ensemble"]["tta_views"] == 5

    threshold = metrics["threshold"]
    csv_path = predict(compose_config(tmp_path / "predict", [f"ckpt={ckpt}", f"input={kermany_root / 'test'}", "tta=true",
                                                              f"threshold={threshold}"], name="predict"))
    rows = list(csv.DictReader(csv_path.open()))
    single = list(csv.DictReader(predict(compose_config(tmp_path / "single", [f"ckpt={ckpt}", f"input={kermany_root / 'test'}"],
                                                        name="predict")).open()))
    assert len(rows) == len(single) == 20
    assert all(r["threshold"] == f"{threshold:.6f}" for r in rows)
    assert any(r["probability_pneumonia"] != s["probability_pneumonia"] for r, s in zip(rows, single))


def test_predict_averages_the_checkpoints_of_a_list(cnn_run: Path, mlp_run: Path, kermany_root: Path, tmp_path: Path,
                                                   caplog) -> None:
    ckpts = [cnn_run / "checkpoints" / "best.ckpt", mlp_run / "checkpoints" / "last.ckpt"]
    outputs = [list(csv.DictReader(predict(compose_config(tmp_path / str(i), [f"ckpt={c}", f"input={kermany_root / 'test'}"],
                                                          name="predict")).open())) for i, c in enumerate(ckpts)]
    caplog.set_level("WARNING", logger="xray_cls.predict")
    both = list(csv.DictReader(predict(compose_config(tmp_path / "both", [f"ckpt=[{ckpts[0]},{ckpts[1]}]",
                                                                          f"input={kermany_root / 'test'}"], name="predict")).open()))
    for row, a, b in zip(both, *outputs):
        assert row["path"] == a["path"] == b["path"]
        mean = (float(a["probability_pneumonia"]) + float(b["probability_pneumonia"])) / 2
        assert float(row["probability_pneumonia"]) == pytest.approx(mean, abs=2e-6)
    assert f"the one ckpt={ckpts[0]} chose for itself" in caplog.text


def test_checkpoints_that_prepare_images_differently_are_refused_in_one_line(cnn_run: Path, mlp_run: Path,
                                                                           tmp_path: Path) -> None:
    other = tmp_path / "other.ckpt"
    checkpoint = torch.load(mlp_run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["preprocessing"]["image_size"] = 64
    torch.save(checkpoint, other)
    first = cnn_run / "checkpoints" / "best.ckpt"
    for module, args in [("xray_cls.evaluate", []), ("xray_cls.predict", [f"input={tmp_path}"])]:
        result = run_cli([f"ckpt=[{first},{other}]", *args, f"hydra.run.dir={tmp_path / module}"], cwd=tmp_path, module=module)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip() == (f"error: ckpt={other} prepares images differently from ckpt={first} (image_size 64, "
                                         "not 28); an ensemble needs checkpoints trained on the same data and image size")
        assert not (tmp_path / module / "metrics.json").exists()
