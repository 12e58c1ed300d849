"""The course report's own networks and its five runs: exact parameter counts, any image size,
the multirun, and the sweep report's section that puts each run beside the report's figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from xray_cls import sweep_report
from xray_cls.models.networks import ReportCNN, ReportDense, build_network
from xray_cls.models.pretrained import PRETRAINING_KEYS
from xray_cls.reports import course_report
from xray_cls.reports.network_summary import network_summary, parameter_counts

from conftest import compose_config, make_kermany_folder, run_cli

REPORT_RUNS = ["dense", "cnn", "cnn_no_dropout", "cnn_strong_aug", "cnn_mild_aug"]


@pytest.mark.parametrize(("model", "expected"), [("report_dense", 524_319), ("report_cnn", 510_850)])
def test_the_report_networks_have_its_parameter_counts_at_256_px(tmp_path: Path, model: str, expected: int) -> None:
    """The report states them: 524,319 (dense) and 510,850 (CNN), with a two-way softmax output."""
    cfg = compose_config(tmp_path, [f"model={model}", "model.head=softmax2", "data=folder", "data.root=x", "data.image_size=256"])
    net_cfg = {**{k: v for k, v in cfg.model.items() if k not in PRETRAINING_KEYS}, "in_channels": 1, "image_size": cfg.data.image_size}
    assert parameter_counts(build_network(net_cfg))["total"] == expected
    one_logit = build_network({**net_cfg, "head": "logit"})  # the framework's default head: one output row fewer
    assert parameter_counts(one_logit)["total"] == expected - one_logit.head[-1].in_features - 1


def test_the_counts_add_up_layer_by_layer() -> None:
    cnn = ReportCNN(1, 256, head="softmax2")
    assert [p.numel() for p in cnn.parameters()] == [288, 32, 18_432, 64, 492_032, 2]  # 320 + 18,496 + 492,034
    dense = ReportDense(1, 256, head="softmax2")
    assert [p.numel() for p in dense.parameters()] == [2, 2, 6, 3, 12, 4, 524_288, 2]  # 4 + 9 + 16 + 524,290


@pytest.mark.parametrize("size", [28, 64, 100, 256])
def test_the_report_networks_work_at_any_image_size(size: int) -> None:
    for net in (ReportCNN(1, size), ReportDense(1, size), ReportCNN(1, size, head="softmax2", dropout=0)):
        assert net(torch.zeros(3, 1, size, size)).shape == (3,)
    flat = 64 * (((size - 2) // 2 - 2) // 2) ** 2
    assert parameter_counts(ReportCNN(1, size))["total"] == 320 + 18_496 + flat + 1


def test_a_two_way_softmax_is_the_same_binary_model() -> None:
    """head=softmax2 returns z1 - z0: its sigmoid is the softmax's probability of PNEUMONIA, and its
    binary cross-entropy the softmax's cross-entropy."""
    torch.manual_seed(0)
    net = ReportCNN(1, 28, head="softmax2", dropout=0).eval()
    images, labels = torch.randn(5, 1, 28, 28), torch.tensor([0, 1, 1, 0, 1])
    pair = net.head(net.features(images))
    logit = net(images)
    assert torch.allclose(torch.sigmoid(logit), pair.softmax(1)[:, 1], atol=1e-6)
    assert torch.allclose(
        torch.nn.functional.binary_cross_entropy_with_logits(logit, labels.float()), torch.nn.functional.cross_entropy(pair, labels), atol=1e-6
    )


def test_the_summary_says_the_count_depends_on_the_size() -> None:
    summary = network_summary(ReportCNN(1, 64), (1, 64, 64))
    assert "total params 31,361" in summary  # 320 + 18,496 + 64 * 14 * 14 + 1
    assert "the course report's count, 510,850, is this network's at 256x256 px, one channel, head=softmax2" in summary


def test_the_experiment_is_the_reports_five_runs(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["+experiment=report", "data.root=x"], hydra_cfg=True)
    assert cfg.hydra.sweeper.params["+report_run"].split(",") == REPORT_RUNS == list(course_report.report_figures()["runs"])
    assert (cfg.data.image_size, cfg.data.batch_size, cfg.trainer.max_epochs, cfg.checkpoint.test) == (256, 32, 12, "last")
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 0.001 and cfg.threshold_rule == "fixed"
    expected = {
        "dense": ("xray_cls.models.networks.ReportDense", 0.5, "none"),
        "cnn": ("xray_cls.models.networks.ReportCNN", 0.5, "none"),
        "cnn_no_dropout": ("xray_cls.models.networks.ReportCNN", 0, "none"),
        "cnn_strong_aug": ("xray_cls.models.networks.ReportCNN", 0.5, "strong"),
        "cnn_mild_aug": ("xray_cls.models.networks.ReportCNN", 0.5, "mild"),
    }
    for run, (target, dropout, aug) in expected.items():
        run_cfg = compose_config(tmp_path, ["+experiment=report", "data.root=x", f"+report_run={run}"])
        assert (run_cfg.model._target_, run_cfg.model.dropout, run_cfg.data.aug, run_cfg.model.head) == (target, dropout, aug, "softmax2")


def test_the_report_figures_file_names_its_source() -> None:
    figures = course_report.report_figures()
    assert "course study" in figures["source"]
    assert figures["runs"]["cnn_strong_aug"]["test_precision"] == 0.62 and figures["runs"]["cnn"]["parameters"] == 510_850


def test_a_last_epoch_run_tests_the_last_epochs_weights(tmp_path: Path) -> None:
    from xray_cls.models.checkpoints import load_classifier
    from xray_cls.train import train

    metrics = train(compose_config(tmp_path, ["model=mlp", "debug=fast", "trainer.max_epochs=2", "checkpoint.test=last",
                                              "gradcam_samples=0"]))
    assert metrics["tested_checkpoint"] == "last"
    last = load_classifier(tmp_path / "checkpoints" / "last.ckpt")
    from xray_cls.evaluate import evaluate

    again = evaluate(compose_config(tmp_path / "eval", [f"ckpt={tmp_path / 'checkpoints' / 'last.ckpt'}", "bootstrap.resamples=0",
                                                        "gradcam_samples=0"], name="evaluate"))
    assert again["confusion_matrix"] == metrics["confusion_matrix"]  # the test was last.ckpt's
    assert last.hparams.threshold == metrics["threshold"]


def test_the_multirun_reports_each_run_beside_the_report(tmp_path: Path) -> None:
    root = make_kermany_folder(tmp_path / "chest_xray")
    sweep = tmp_path / "sweep"
    done = run_cli(["-m", "+experiment=report", f"data.root={root}", "data.image_size=32", "debug=fast", "gradcam_samples=0",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (sweep / "report.md").read_text()
    section = text.split("## Beside the course report")[1]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "report run" not in line and "---" not in line]
    labels = [course_report.report_figures()["runs"][run]["label"] for run in REPORT_RUNS]
    assert len(rows) == 5 and all(f"| {label.replace('_', chr(92) + '_')} | " in row for label, row in zip(labels, rows))
    for job, row in enumerate(rows):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        ours = f"{metrics['last_epoch']['loss/train']:.4f} / {course_report.report_figures()['runs'][REPORT_RUNS[job]]['train_loss']:.4f}"
        assert ours in row and f"{metrics['test']['precision']:.4f} / " in row
        assert metrics["tested_checkpoint"] == "last"
    assert "Where the two can differ" in section and "development test" in section


def test_runs_outside_the_experiment_get_no_report_section(tmp_path: Path, mlp_run: Path) -> None:
    sweep = tmp_path / "SW"
    shutil.copytree(mlp_run, sweep / "0", ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    (sweep / "0" / ".hydra").mkdir()
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- model=mlp\n- +report_run=unknown\n")
    assert "Beside the course report" not in sweep_report.write_report(sweep).read_text()
