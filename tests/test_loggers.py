"""The `logger=` configs: a real MLflow tracking server asked over its API, CSV files, W&B offline,
several loggers at once, and curves.csv, which every run writes whichever logger it used."""

from __future__ import annotations

import csv
import json
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from xray_cls.core.untrusted import read_epoch_curves
from xray_cls.reports.sweep_runs import read_curves
from xray_cls.train import train
from xray_cls.training.loggers import build_loggers

from conftest import SHORT_RUN, compose_config, free_port, local_server, run_cli
from test_train import load_events

pytestmark = pytest.mark.slow  # starts an MLflow server and runs through the CLI

CURVE_TAGS = ["loss/train", "loss/val", "acc/train", "acc/val"]
FIGURES = ["confusion_matrix", "roc_curve", "pr_curve", "gradcam"]
PNG = b"\x89PNG\r\n\x1a\n"


@contextmanager
def mlflow_server(folder: Path, timeout: float = 120) -> Iterator[str]:
    """`mlflow server` with a SQLite backend and a local artifact folder on a free local port;
    yields its URL once /health answers, and stops it after."""
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'xray_cls[loggers]')")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
    ]

    def healthy() -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200

    with local_server(command, "mlflow server", healthy, timeout):
        yield url


def run_name(overrides: list[str]) -> str:
    """The name a run gets in MLflow: its overrides, sorted, without the tracking URI."""
    return ",".join(sorted(o for o in overrides if not o.startswith("logger.tracking_uri=")))


def assert_curves_match(curves: dict[int, dict[str, float]], epochs: int, history: dict[str, list[float]]) -> None:
    """A logger's per-epoch values (history: tag -> values in epoch order) are curves.csv's."""
    assert sorted(curves) == list(range(1, epochs + 1))
    for tag in CURVE_TAGS:
        assert history[tag] == pytest.approx([curves[e][tag] for e in sorted(curves)], rel=1e-6), tag


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as url:
        yield url


def test_mlflow_server_receives_params_curves_test_metrics_and_figures(mlflow_url: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    overrides = ["logger=mlflow", f"logger.tracking_uri={mlflow_url}", "model=cnn", *SHORT_RUN]
    result = run_cli([*overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())

    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name("xray_cls")
    (run,) = client.search_runs([experiment.experiment_id])
    print(f"MLflow run {run.info.run_id} ({run.info.run_name!r}, {run.info.status}) read back from {mlflow_url}:")
    print("  params", dict(sorted(run.data.params.items())))
    print("  test metrics", {k: round(v, 4) for k, v in sorted(run.data.metrics.items()) if k.startswith("test/")})
    assert run.info.status == "FINISHED"
    assert run.info.run_name == run_name(overrides)
    assert run.data.params["model"] == "cnn"
    assert float(run.data.params["lr"]) == metrics["hparams"]["lr"]
    assert int(run.data.params["batch_size"]) == 32 and int(run.data.params["max_epochs"]) == 2

    history = {}
    for tag in CURVE_TAGS:
        points = client.get_metric_history(run.info.run_id, tag)
        history[tag] = [p.value for p in sorted(points, key=lambda p: p.step)]
        print(f"  {tag} by epoch", [round(v, 4) for v in history[tag]])
        assert len({p.step for p in points}) == len(points) == metrics["epochs"] == 2, tag
    assert_curves_match(read_epoch_curves(run_dir / "curves.csv"), metrics["epochs"], history)
    for key, value in metrics["test"].items():
        assert run.data.metrics[f"test/{key}"] == pytest.approx(value), key

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    print("  artifacts", sorted(artifacts))
    assert {f"figures/{name}.png" for name in FIGURES} <= artifacts
    local = client.download_artifacts(run.info.run_id, "figures/confusion_matrix.png", str(tmp_path))
    assert Path(local).read_bytes()[:8] == PNG
    assert not (run_dir / "tensorboard").exists()  # logger=mlflow replaces the default


def test_a_sweep_is_one_mlflow_experiment_with_a_run_per_job(mlflow_url: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    sweep_dir = tmp_path / "sweep"
    args = ["-m", "logger=[tensorboard,mlflow]", f"logger.tracking_uri={mlflow_url}", "model=mlp,cnn", *SHORT_RUN,
            "gradcam_samples=0", f"hydra.sweep.dir={sweep_dir}"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name(f"xray_cls sweep {sweep_dir}")
    runs = client.search_runs([experiment.experiment_id])
    common = ["logger=[tensorboard,mlflow]", *SHORT_RUN, "gradcam_samples=0"]
    assert sorted(r.info.run_name for r in runs) == sorted(run_name([*common, f"model={m}"]) for m in ("mlp", "cnn"))
    for run in runs:
        assert f"model={run.data.params['model']}" in run.info.run_name.split(",")
        assert len(client.get_metric_history(run.info.run_id, "loss/val")) == 2
    # Both loggers got the runs, and the sweep report read them from curves.csv.
    with (sweep_dir / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for job in ("0", "1"):
        assert len(load_events(sweep_dir / job).Scalars("loss/val")) == 2
        assert {tag: len(values) for tag, values in read_curves(sweep_dir / job).items()} == {"acc/val": 2, "loss/val": 2}
    assert (sweep_dir / "figures" / "val_loss.png").read_bytes()[:8] == PNG


def test_a_resumed_run_continues_its_mlflow_run(mlflow_url: str, tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["logger=mlflow", f"logger.tracking_uri={mlflow_url}"])
    first, _ = build_loggers(cfg.logger, tmp_path)
    resumed, _ = build_loggers(cfg.logger, tmp_path)  # the same run folder, as ckpt_path= resumes in it
    assert resumed.run_id == first.run_id
    (tmp_path / "another_run").mkdir()
    other, _ = build_loggers(cfg.logger, tmp_path / "another_run")
    assert other.run_id != first.run_id


def test_csv_logger_through_the_cli_in_debug_fast(tmp_path: Path) -> None:
    """The issue's smoke check: python -m xray_cls logger=csv debug=fast."""
    run_dir = tmp_path / "run"
    result = run_cli(["logger=csv", "debug=fast", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["n_test"] == 624  # the whole test split, one epoch
    assert "test_ci" not in metrics and "CI" not in result.stdout  # debug=fast: no bootstrap
    assert not (run_dir / "tensorboard").exists()

    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    history = {tag: [float(r[tag]) for r in rows if r.get(tag)] for tag in CURVE_TAGS}
    assert_curves_match(read_epoch_curves(run_dir / "curves.csv"), 1, history)
    test_row = next(r for r in rows if r.get("test/accuracy"))
    assert float(test_row["test/accuracy"]) == pytest.approx(metrics["test"]["accuracy"])
    assert yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())["model"] == "cnn"
    for name in FIGURES:  # beside metrics.csv
        assert (run_dir / "csv" / f"{name}.png").read_bytes()[:8] == PNG, name


def test_tensorboard_and_csv_together(tmp_path: Path) -> None:
    metrics = train(compose_config(tmp_path, ["logger=[tensorboard,csv]", "model=mlp", "gradcam_samples=0", *SHORT_RUN]))
    curves = read_epoch_curves(tmp_path / "curves.csv")
    events = load_events(tmp_path)
    history = {tag: [e.value for e in events.Scalars(tag)] for tag in CURVE_TAGS}
    assert_curves_match(curves, metrics["epochs"], history)
    assert "test/confusion_matrix" in events.Tags()["images"]
    assert (tmp_path / "csv" / "confusion_matrix.png").is_file() and (tmp_path / "csv" / "metrics.csv").is_file()


def test_wandb_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B 0.31 keeps an offline run in its binary transaction log (run-<id>.wandb, uploaded later by
    `wandb sync`) and the images as files: the figures are checked as files, the rest by name."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'xray_cls[loggers]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    train(compose_config(tmp_path, ["logger=wandb", "model=mlp", *SHORT_RUN]))
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    # wandb's service process writes the log after run.finish() returns; its own log says when done.
    internal_log, deadline = run_dir / "logs" / "debug-internal.log", time.monotonic() + 60
    while "stream: all finished" not in internal_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    (log,) = run_dir.glob("run-*.wandb")
    recorded = log.read_bytes()
    for name in [*CURVE_TAGS, "test/accuracy", "test/auroc", "batch_size", "threshold_rule"]:
        assert name.encode() in recorded, name
    images = run_dir / "files" / "media" / "images" / "test"
    for name in ("confusion_matrix", "roc_curve", "pr_curve"):  # an MLP has no Grad-CAM
        (png,) = images.glob(f"{name}_*.png")
        assert png.read_bytes()[:8] == PNG
