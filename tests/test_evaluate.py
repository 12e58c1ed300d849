"""`python -m xray_cls.evaluate`: a checkpoint's test metrics on any data the data configs describe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xray_cls.core.errors import UserInputError
from xray_cls.evaluate import evaluate

from conftest import FOLDER_LAYOUT, compose_config, image_count, run_cli
from test_predict import with_geometry
from test_train import assert_confusion_matrix_adds_up, load_events


def evaluate_in(out_dir: Path, ckpt: Path, *overrides: str) -> dict:
    return evaluate(compose_config(out_dir, [f"ckpt={ckpt}", *overrides], name="evaluate"))


def test_evaluating_a_runs_checkpoint_reproduces_its_test_results(cnn_run: Path, tmp_path: Path) -> None:
    run = json.loads((cnn_run / "metrics.json").read_text())
    metrics = evaluate_in(tmp_path, cnn_run / "checkpoints" / "best.ckpt")
    assert metrics["confusion_matrix"] == run["confusion_matrix"]
    assert metrics["test"] == pytest.approx(run["test"], abs=1e-6)
    assert metrics["threshold_rule"] == run["threshold_rule"]  # the run's youden threshold, from the checkpoint
    assert json.loads((tmp_path / "metrics.json").read_text())["n_test"] == 624
    assert (tmp_path / "figures" / "gradcam.png").is_file()


def test_folder_data_is_prepared_as_the_checkpoint_was_trained(cnn_run: Path, kermany_root: Path, tmp_path: Path) -> None:
    """A 28 px model on a folder configured for 64 px: the checkpoint's size and statistics win."""
    ckpt = cnn_run / "checkpoints" / "best.ckpt"
    metrics = evaluate_in(tmp_path, ckpt, "data=folder", f"data.root={kermany_root}", "data.image_size=64",
                          f"data.cache_dir={tmp_path / 'cache'}")
    run = json.loads((cnn_run / "metrics.json").read_text())
    n_test = image_count(FOLDER_LAYOUT, "test")
    n_positive = sum(n for split, name, n in FOLDER_LAYOUT if split == "test" and name.lower() == "pneumonia")
    assert_confusion_matrix_adds_up(metrics, n_test=n_test, n_positive=n_positive)
    assert metrics["preprocessing"]["image_size"] == 28
    assert metrics["threshold"] == run["threshold"]
    # only the evaluated split is decoded: one cache entry, at the checkpoint's size and geometry
    assert [p.name.split("-")[1:3] for p in (tmp_path / "cache").glob("*.npy")] == [["28", "crop"]]


@pytest.mark.parametrize("geometry", ["stretch", None])  # None: a checkpoint from before geometry was recorded
def test_folder_images_get_the_checkpoints_geometry(cnn_run: Path, kermany_root: Path, tmp_path: Path,
                                                     geometry: str | None, caplog) -> None:
    ckpt = with_geometry(cnn_run / "checkpoints" / "best.ckpt", tmp_path / "model.ckpt", geometry)
    caplog.set_level("INFO", logger="xray_cls.data")
    evaluate_in(tmp_path / "out", ckpt, "data=folder", f"data.root={kermany_root}", "data.geometry=crop",
                f"data.cache_dir={tmp_path / 'cache'}", "gradcam_samples=0")
    # the decoded folders are cached under the size and geometry they were read with
    assert [p.name.split("-")[1:3] for p in (tmp_path / "cache").glob("*.npy")] == [["28", "stretch"]]  # test/ alone
    assert ("records no preprocessing geometry" in caplog.text) == (geometry is None)


def test_a_chosen_split_and_threshold(cnn_run: Path, tmp_path: Path) -> None:
    metrics = evaluate_in(tmp_path, cnn_run / "checkpoints" / "best.ckpt", "split=val", "threshold=0.9")
    assert metrics["n_test"] == 524  # PneumoniaMNIST's val split
    assert metrics["threshold_rule"] == {"rule": "fixed", "threshold": 0.9}


def test_an_unknown_split_is_named(cnn_run: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="split='holdout' is not a split of this data; expected one of train, val, test"):
        evaluate_in(tmp_path, cnn_run / "checkpoints" / "best.ckpt", "split=holdout")


def test_cli_writes_metrics_figures_and_tensorboard_images(cnn_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "evaluation"
    result = run_cli([f"ckpt={cnn_run / 'checkpoints' / 'best.ckpt'}", f"hydra.run.dir={out}"], cwd=tmp_path,
                     module="xray_cls.evaluate")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Test results of" in result.stdout and "624 images" in result.stdout
    for name in ("confusion_matrix", "roc_curve", "pr_curve", "gradcam"):
        assert (out / "figures" / f"{name}.png").is_file()
    assert {"test/confusion_matrix", "test/gradcam"} <= set(load_events(out).Tags()["images"])


def test_missing_checkpoint_through_the_cli(tmp_path: Path) -> None:
    result = run_cli(["ckpt=runs/none/best.ckpt"], cwd=tmp_path, module="xray_cls.evaluate")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ckpt=runs/none/best.ckpt does not exist; expected a .ckpt file")


def test_a_bf16_runs_test_is_reproduced_by_a_float32_evaluation(tmp_path: Path) -> None:
    """Training runs under bf16 autocast, its test in float32: evaluate (32-true) gives the same figures."""
    from xray_cls.train import train

    from conftest import SHORT_RUN

    run = train(compose_config(tmp_path / "run", ["model=cnn", "trainer.precision=bf16-mixed", "gradcam_samples=0",
                                                  "bootstrap.resamples=10", *SHORT_RUN]))
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    metrics = evaluate_in(tmp_path / "evaluate", ckpt, "gradcam_samples=0", "bootstrap.resamples=10")
    assert metrics["confusion_matrix"] == run["confusion_matrix"]
    assert metrics["test"] == pytest.approx(run["test"], abs=1e-6)
    # The test step itself computes in float32 under bf16 autocast, not only after it.
    again = evaluate_in(tmp_path / "evaluate_bf16", ckpt, "gradcam_samples=0", "bootstrap.resamples=10",
                        "trainer.precision=bf16-mixed")
    assert again["test"] == pytest.approx(metrics["test"], abs=1e-6)


def test_test_probabilities_are_float32_under_bf16_autocast() -> None:
    import torch

    from xray_cls.models.classifier import XrayClassifier

    net = {"_target_": "xray_cls.models.networks.CNN", "in_channels": 1, "image_size": 8, "channels": [4], "hidden": [], "dropout": 0}
    module = XrayClassifier(net=net)
    images, labels = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 0, 1, 1, 0])
    with torch.no_grad():
        reference = torch.sigmoid(module(images))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert module(images).dtype == torch.bfloat16  # what autocast alone would give
            _, probs, _ = module._scored(module.float32_logits(images) / module.temperature, labels)  # as test_step
    assert probs.dtype == torch.float32
    assert torch.equal(probs, reference)
