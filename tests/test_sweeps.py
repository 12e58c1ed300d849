"""Multiruns through the real entry point: the sweep report, failed runs, HParams, launchers, Optuna."""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from hydra.utils import get_class
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from xray_cls import sweep_report

from conftest import SHORT_RUN, compose_config, run_cli

pytestmark = pytest.mark.slow  # runs multiruns through the CLI (basic, joblib, Optuna)

FIGURES = ["val_accuracy.png", "val_loss.png", "confusion_matrices.png", "test_metrics.png"]


def run_sweep(sweep_dir: Path, *args: str) -> None:
    result = run_cli(["-m", *args, *SHORT_RUN, f"hydra.sweep.dir={sweep_dir}"], cwd=sweep_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]


def read_summary(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four runs, the second and fourth failing on a bad override."""
    sweep_dir = tmp_path_factory.mktemp("sweeps") / "sweep"
    run_sweep(sweep_dir, "model=mlp,cnn", "data.aug=mild,bogus")
    return sweep_dir


def test_failed_runs_do_not_stop_the_sweep(sweep: Path) -> None:
    rows = read_summary(sweep)
    assert [(r["run"], r["status"]) for r in rows] == [("0", "ok"), ("1", "failed"), ("2", "ok"), ("3", "failed")]
    for row in rows[1::2]:
        assert "data.aug='bogus'" in row["error"] and "expected one of none, mild, strong" in row["error"]
        assert "data.aug=bogus" in row["overrides"]
        assert json.loads((sweep / row["run"] / "failed.json").read_text())["error"] == row["error"]


def test_summary_agrees_with_each_runs_metrics(sweep: Path) -> None:
    for row in read_summary(sweep):
        if row["status"] != "ok":
            continue
        metrics = json.loads((sweep / row["run"] / "metrics.json").read_text())
        cells = [int(row[k]) for k in ("tn", "fp", "fn", "tp")]
        assert cells == [metrics["confusion_matrix"][k] for k in ("tn", "fp", "fn", "tp")]
        assert sum(cells) == 624
        for key in ("accuracy", "precision", "recall", "specificity", "f1", "auroc"):
            assert float(row[key]) == pytest.approx(metrics["test"][key])
        assert float(row["val_acc"]) == pytest.approx(metrics["last_epoch"]["acc/val"])
        assert float(row["best_val"]) == pytest.approx(metrics["best_checkpoint"]["score"])  # not the last epoch's
        assert float(row["threshold"]) == pytest.approx(metrics["threshold"])
        assert int(row["params"]) == metrics["params"]["total"]


def test_report_ranks_and_bolds_by_the_val_metric_only(sweep: Path) -> None:
    text = (sweep / "report.md").read_text()
    rows = [r for r in read_summary(sweep) if r["status"] == "ok"]
    best = {r["run"]: json.loads((sweep / r["run"] / "metrics.json").read_text())["best_checkpoint"] for r in rows}
    assert {b["monitor"] for b in best.values()} == {"loss/val"} and {b["mode"] for b in best.values()} == {"min"}
    chosen = min(rows, key=lambda r: float(r["best_val"]))  # loss/val: lowest is best
    assert sorted(int(r["val_rank"]) for r in rows) == [1, 2] and chosen["val_rank"] == "1"
    assert all(r["val_rank"] == "" for r in read_summary(sweep) if r["status"] != "ok")
    # one bold cell: the chosen run's best val score; no test value is marked
    assert re.findall(r"\*\*([^*]+)\*\*", text) == [f"{float(chosen['best_val']):.4f}"]
    table = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert table[0].startswith(f"| 1 | {chosen['run']} |")  # ranked order, best first
    section = text.split("## Chosen on val")[1].split("|")[0]
    assert f"Run {chosen['run']} (" in section and f"loss/val {float(chosen['best_val']):.4f}" in section
    assert f"accuracy {float(chosen['accuracy']):.4f}" in section and f"auroc {float(chosen['auroc']):.4f}" in section
    assert text.count("| failed |") == 2
    assert "run 1 (failed): data.aug='bogus'" in text
    for name in FIGURES:
        assert f"(figures/{name})" in text
        assert (sweep / "figures" / name).read_bytes()[:4] == b"\x89PNG"


def test_runs_chosen_by_different_val_metrics_are_not_ranked(sweep: Path, tmp_path: Path) -> None:
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    metrics = json.loads((copy / "2" / "metrics.json").read_text())
    metrics["best_checkpoint"].update(monitor="auroc/val", mode="max")
    (copy / "2" / "metrics.json").write_text(json.dumps(metrics))
    text = sweep_report.write_report(copy).read_text()
    assert "No run is ranked: the runs chose their checkpoints by different val metrics: auroc/val (max), loss/val (min)" in text
    assert "**" not in text and "## Chosen on val" not in text
    assert all(r["val_rank"] == "" for r in read_summary(copy))


def test_report_rebuilds_identically_from_a_copied_folder(sweep: Path, tmp_path: Path) -> None:
    copy = tmp_path / sweep.name
    shutil.copytree(sweep, copy)
    for name in ("report.md", "summary.csv"):
        (copy / name).unlink()
    shutil.rmtree(copy / "figures")
    sweep_report.main([str(copy)])
    sweep_report.main([str(copy)])  # and again: idempotent
    for name in ["report.md", "summary.csv", *(f"figures/{f}" for f in FIGURES)]:
        assert (copy / name).read_bytes() == (sweep / name).read_bytes(), name


def test_each_run_logs_hparams_for_the_hparams_dashboard(sweep: Path) -> None:
    for run, model in (("0", "mlp"), ("2", "cnn")):
        events = EventAccumulator(str(sweep / run / "tensorboard")).Reload()
        content = events.PluginTagToContent("hparams")
        start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["model"].string_value == model
        assert start.hparams["aug"].string_value == "mild"
        assert {"lr", "dropout", "batch_size", "seed", "image_size"} <= set(start.hparams)
        experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert start.hparams["checkpoint"].string_value == "loss/val (min)"
        metric_tags = [m.name.tag for m in experiment.metric_infos]
        assert metric_tags[0] == "hparams/best_loss_val"  # the column runs are chosen by comes first
        assert {"hparams/test_accuracy", "hparams/acc_val", "hparams/loss_val"} <= set(metric_tags)
        best = json.loads((sweep / run / "metrics.json").read_text())["best_checkpoint"]["score"]
        assert events.Scalars("hparams/best_loss_val")[-1].value == pytest.approx(best)
        for tag in metric_tags:  # every HParams metric column has its value in the run
            assert events.Scalars(tag)


def test_joblib_launcher_runs_a_sweep_in_parallel_processes(tmp_path: Path) -> None:
    # The default sweep folder: the job processes must find the folder their parent claimed.
    result = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=mlp,cnn", *SHORT_RUN], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1"]
    rows = read_summary(sweep_dir)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    hydra_cfg = yaml.safe_load((sweep_dir / "0" / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert "JoblibLauncher" in hydra_cfg["launcher"]["_target_"]


def test_optuna_search_returns_the_validation_objective(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    run_sweep(sweep_dir, "hparams_search=optuna", "hydra.sweeper.n_trials=2")
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    scores = [json.loads((sweep_dir / r / "metrics.json").read_text())["best_checkpoint"] for r in ("0", "1")]
    assert all(s["monitor"] == "auroc/val" for s in scores)
    assert results["best_value"] == pytest.approx(max(s["score"] for s in scores))
    assert set(results["best_params"]) == {"optimizer.lr", "model.dropout", "data.aug"}
    assert len(read_summary(sweep_dir)) == 2


def test_slurm_launcher_config_composes(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1


def test_study_experiment_is_the_twelve_run_study(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["+experiment=study"], hydra_cfg=True)
    params = cfg.hydra.sweeper.params
    grid = list(itertools.product(*(str(v).split(",") for v in params.values())))
    assert len(grid) == 12
    assert set(params) == {"model", "model.dropout", "data.aug"}


def test_report_of_an_interrupted_run(tmp_path: Path, sweep: Path) -> None:
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    (copy / "2" / "metrics.json").unlink()
    sweep_report.write_report(copy)
    statuses = [r["status"] for r in read_summary(copy)]
    assert statuses == ["ok", "failed", "incomplete", "failed"]


def test_report_of_a_folder_without_runs_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sweep_report.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"error: {tmp_path} holds no runs" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,direction", [
    ([], "maximize"),  # optuna's own default: auroc/val, max
    (["checkpoint.monitor=loss/val", "checkpoint.mode=min"], "minimize"),
    (["checkpoint.monitor=acc/val", "checkpoint.mode=max"], "maximize"),
])
def test_optuna_direction_follows_checkpoint_mode(overrides: list[str], direction: str, tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["hparams_search=optuna", *overrides], hydra_cfg=True)
    assert cfg.hydra.sweeper.direction == direction


def test_an_unknown_checkpoint_mode_is_named(tmp_path: Path) -> None:
    from omegaconf.errors import InterpolationResolutionError

    cfg = compose_config(tmp_path, ["hparams_search=optuna", "checkpoint.mode=best"], hydra_cfg=True)
    with pytest.raises(InterpolationResolutionError, match="checkpoint.mode='best' is not valid; expected min or max"):
        cfg.hydra.sweeper.direction
