"""Three or more classes: a softmax head, argmax decisions and N-class metrics, through training,
the report, predict, evaluate (ensembles and TTA), export, the sweep report and the checkpoint."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xray_cls import sweep_report
from xray_cls.core.checkpoint_files import write_checkpoint
from xray_cls.core.errors import UserInputError
from xray_cls.evaluate import evaluate
from xray_cls.metrics.bootstrap import bootstrap_intervals
from xray_cls.metrics.calibration import fit_temperature
from xray_cls.metrics.per_class import per_class_scores
from xray_cls.models.checkpoints import load_classifier, read_checkpoint
from xray_cls.predict import predict
from xray_cls.train import train
from xray_cls.training.losses import class_weights

from conftest import SHORT_RUN, compose_config, write_kermany_named_folder
from test_train import load_events

# A public four-folder layout (COVID-19 Radiography Database), names with a space and mixed case.
FOUR = ["COVID", "Normal", "Lung_Opacity", "Viral Pneumonia"]
PER_CLASS = {"train": 24, "test": 8}


def write_class_image(path: Path, label: int, classes: int, index: int) -> None:
    """A noisy gray image whose mean brightness says its class: a short run must learn it."""
    rng = np.random.default_rng(index)
    base = 30 + 195 * label / (classes - 1)
    pixels = np.clip(rng.normal(base, 20, (36 + index % 5, 40)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "L").save(path.with_suffix(".png" if index % 2 else ".jpeg"))


def write_class_folders(root: Path, names: list[str]) -> Path:
    index = 0
    for split, n in PER_CLASS.items():
        for label, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                index += 1
                write_class_image(root / split / name / f"{name.split()[0].lower()}-{i}", label, len(names), index)
    (root / "train" / FOUR[0] / ".DS_Store").write_bytes(b"\x00junk")
    return root


def four_class_overrides(root: Path, cache: Path) -> list[str]:
    return [*SHORT_RUN, "data=folder", f"data.root={root}", "data.classes=[COVID,Normal,Lung_Opacity,'Viral Pneumonia']",
            "data.image_size=24", "data.batch_size=16", f"data.cache_dir={cache}", "trainer.limit_train_batches=1.0",
            "trainer.limit_val_batches=1.0", "trainer.max_epochs=12", "optimizer.lr=0.003", "loss.class_weight=balanced", "calibration=temperature",
            "checkpoint.monitor=auroc/val", "checkpoint.mode=max", "bootstrap.resamples=50", "gradcam_samples=4"]


@pytest.fixture(scope="module")
def four_class(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """(data root, run folder, metrics) of a CNN trained on four class folders."""
    root = write_class_folders(tmp_path_factory.mktemp("four") / "data", FOUR)
    out = tmp_path_factory.mktemp("four_run")
    metrics = train(compose_config(out, four_class_overrides(root, out / "cache")))
    return root, out, metrics


def test_four_class_folders_train_test_and_report(four_class, capsys: pytest.CaptureFixture) -> None:
    root, out, metrics = four_class
    assert metrics["class_names"] == FOUR and "threshold" not in metrics and "positive_class" not in metrics
    matrix = metrics["confusion_matrix"]["matrix"]
    assert len(matrix) == 4 and all(len(row) == 4 for row in matrix)
    assert sum(map(sum, matrix)) == metrics["n_test"] == 4 * PER_CLASS["test"]
    assert [sum(row) for row in matrix] == [PER_CLASS["test"]] * 4  # rows: the true class
    assert [metrics["per_class"][n]["support"] for n in FOUR] == [PER_CLASS["test"]] * 4
    assert metrics["test"]["accuracy"] == pytest.approx(sum(matrix[k][k] for k in range(4)) / metrics["n_test"])
    assert metrics["test"]["accuracy"] >= 0.75  # chance is 0.25: the brightness was learned
    recalls = [metrics["per_class"][n]["recall"] for n in FOUR]
    assert metrics["test"]["recall"] == pytest.approx(sum(recalls) / 4)  # macro
    for key in ("accuracy", "recall", "specificity", "auroc"):  # the macro scores' intervals hold them
        low, high = metrics["test_ci"][key]
        assert low <= metrics["test"][key] + 1e-9 and metrics["test"][key] <= high + 1e-9
    assert metrics["calibration"]["of"].startswith("the top-class probability") and metrics["calibration"]["temperature"] > 0
    assert json.loads((out / "metrics.json").read_text())["confusion_matrix"]["matrix"] == matrix
    for figure in ("confusion_matrix", "roc_curve", "pr_curve", "reliability_diagram", "gradcam"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000
    events = load_events(out)
    assert "test/confusion_matrix" in events.Tags()["images"]  # the 4 x 4 matrix in TensorBoard
    recall = events.Scalars("test_per_class/Viral_Pneumonia/recall")[-1].value
    assert recall == pytest.approx(metrics["per_class"]["Viral Pneumonia"]["recall"], abs=1e-6)
    assert events.Scalars("test/auroc")[-1].value == pytest.approx(metrics["test"]["auroc"], abs=1e-6)
    hparams = read_checkpoint(out / "checkpoints" / "best.ckpt")["hyper_parameters"]
    assert hparams["net"]["num_classes"] == 4 and len(hparams["class_weight"]) == 4


def test_predict_writes_one_probability_per_class_and_evaluate_agrees(four_class, tmp_path: Path) -> None:
    root, out, metrics = four_class
    ckpt = out / "checkpoints" / "best.ckpt"
    csv_path = predict(compose_config(tmp_path / "pr", [f"ckpt={ckpt}", f"input={root / 'test'}", "gradcam=true"], name="predict"))
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = ["probability_covid", "probability_normal", "probability_lung_opacity", "probability_viral_pneumonia"]
    assert list(rows[0]) == ["path", *columns, "predicted_label", "gradcam"]
    assert len(rows) == 4 * PER_CLASS["test"]
    for row in rows:
        probs = [float(row[c]) for c in columns]
        assert sum(probs) == pytest.approx(1, abs=1e-5)
        assert row["predicted_label"] == FOUR[int(np.argmax(probs))]
        assert (csv_path.parent / row["gradcam"]).is_file()
    called = {n: sum(r["predicted_label"] == n for r in rows) for n in FOUR}
    assert list(called.values()) == [sum(col) for col in zip(*metrics["confusion_matrix"]["matrix"])]  # the columns
    evaluated = evaluate(compose_config(tmp_path / "ev", ["data=folder", f"data.root={root}", f"ckpt={ckpt}",
                                                          f"data.cache_dir={out / 'cache'}"], name="evaluate"))
    assert evaluated["confusion_matrix"] == metrics["confusion_matrix"]


def test_an_ensemble_and_tta_average_the_class_probabilities(four_class, tmp_path: Path) -> None:
    root, out, metrics = four_class
    best = out / "checkpoints" / "best.ckpt"
    single = load_classifier(best)
    twice = predict(compose_config(tmp_path / "pr", [f"ckpt=[{best},{best}]", f"input={root / 'test'}"], name="predict"))
    alone = predict(compose_config(tmp_path / "pr1", [f"ckpt={best}", f"input={root / 'test'}"], name="predict"))
    def read(path: Path) -> list[list[str]]:
        with open(path, newline="") as f:
            return list(csv.reader(f))[1:]

    for a, b in zip(read(twice), read(alone), strict=True):  # the mean of one model's probabilities, twice, is its own
        assert a[0] == b[0] and a[-2] == b[-2] and np.allclose([float(x) for x in a[1:5]], [float(x) for x in b[1:5]], atol=1e-5)
    evaluated = evaluate(compose_config(tmp_path / "ev", ["data=folder", f"data.root={root}", f"ckpt=[{best},{best}]", "tta=true",
                                                          f"data.cache_dir={out / 'cache'}"], name="evaluate"))
    assert evaluated["ensemble"]["tta"] and sum(map(sum, evaluated["confusion_matrix"]["matrix"])) == metrics["n_test"]
    assert single.num_classes == 4


def test_export_gives_the_checkpoints_class_probabilities(four_class, tmp_path: Path) -> None:
    import onnxruntime

    from xray_cls.data import normalize
    from xray_cls.export import export

    _, out, _ = four_class
    ckpt = out / "checkpoints" / "best.ckpt"
    model_path = export(compose_config(tmp_path / "ex", [f"ckpt={ckpt}"], name="export"))
    sidecar = json.loads((model_path.parent / "model.json").read_text())
    assert sidecar["class_names"] == FOUR and sidecar["output"]["shape"] == ["batch", 4] and "threshold" not in sidecar
    module = load_classifier(ckpt)
    prep = module.hparams.preprocessing
    images = torch.randint(0, 256, (5, 1, prep["image_size"], prep["image_size"]), dtype=torch.uint8)
    expected = module.predict_probabilities(normalize(images, prep["mean"], prep["std"])).numpy()
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": images.numpy()})
    assert got.shape == (5, 4) and np.allclose(got, expected, atol=1e-5)


def test_three_classes_from_kermany_names(tmp_path: Path) -> None:
    root = tmp_path / "kermany"
    counts = write_kermany_named_folder(root)
    out = tmp_path / "run"
    metrics = train(compose_config(out, [*SHORT_RUN, "data=folder", f"data.root={root}", "task=normal_bacterial_viral",
                                         "data.image_size=24", "data.batch_size=8", f"data.cache_dir={tmp_path / 'cache'}"]))
    assert metrics["class_names"] == ["NORMAL", "BACTERIAL", "VIRAL"]
    assert [sum(row) for row in metrics["confusion_matrix"]["matrix"]] == [counts["test"][n] for n in metrics["class_names"]]
    with open(out / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        expected = "NORMAL" if "/NORMAL/" in f"/{row['path']}" else ("BACTERIAL" if "_bacteria_" in row["path"] else "VIRAL")
        assert row["label"] == expected
    sides = {}
    for row in rows:
        sides.setdefault(row["split"], set()).add(row["patient"])
    assert sides["val"] and not sides["train"] & sides["val"]
    assert {r["label"] for r in rows if r["split"] == "val"} == {"NORMAL", "BACTERIAL", "VIRAL"}  # stratified by class


@pytest.fixture(scope="module")
def three_label_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled PneumoniaMNIST cut to 600 train images, with a third label: the brightest third of each split."""
    from xray_cls.data import BUNDLED_NPZ

    arrays = dict(np.load(BUNDLED_NPZ))
    out = {}
    for split, n in (("train", 600), ("val", 150), ("test", 150)):
        images, labels = arrays[f"{split}_images"][:n], arrays[f"{split}_labels"][:n].copy()
        brightness = images.reshape(len(images), -1).mean(1)
        labels[brightness > np.quantile(brightness, 2 / 3), 0] = 2
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    path = tmp_path_factory.mktemp("npz") / "three.npz"
    np.savez(path, **out)
    return path


def test_an_npz_with_three_labels_is_three_classes(three_label_npz: Path, tmp_path: Path) -> None:
    metrics = train(compose_config(tmp_path / "a", [*SHORT_RUN, f"data.path={three_label_npz}", "data.mixup=0.4",
                                                    "loss.label_smoothing=0.1"]))
    assert metrics["class_names"] == ["class_0", "class_1", "class_2"]
    labels = np.load(three_label_npz)["test_labels"].reshape(-1)
    assert [sum(row) for row in metrics["confusion_matrix"]["matrix"]] == np.bincount(labels, minlength=3).tolist()
    named = train(compose_config(tmp_path / "b", [*SHORT_RUN, f"data.path={three_label_npz}", "data.classes=[normal,pneumonia,bright]"]))
    assert named["class_names"] == ["normal", "pneumonia", "bright"]
    with pytest.raises(UserInputError, match=r"three.npz holds labels up to 2; data.classes names 0 \(a\), 1 \(b\): expected one name per label"):
        train(compose_config(tmp_path / "c", [*SHORT_RUN, f"data.path={three_label_npz}", "data.classes=[a,b]"]))
    with pytest.raises(UserInputError, match="threshold_rule=youden chooses a threshold for two classes; this task has 3"):
        train(compose_config(tmp_path / "d", [*SHORT_RUN, f"data.path={three_label_npz}", "threshold_rule=youden"]))
    assert not (tmp_path / "d" / "checkpoints").exists()  # refused once the labels were read, before training


def test_a_binary_runs_metrics_json_keeps_its_format(cnn_run: Path) -> None:
    metrics = json.loads((cnn_run / "metrics.json").read_text())
    test_part = {"class_names", "positive_class", "threshold", "threshold_rule", "n_test", "confusion_matrix", "test", "calibration"}
    assert test_part <= set(metrics) and not {"decision", "per_class", "averaging"} & set(metrics)
    assert set(metrics["confusion_matrix"]) == {"rows", "columns", "matrix", "tn", "fp", "fn", "tp"}
    assert set(metrics["test"]) == {"accuracy", "precision", "recall", "specificity", "f1", "auroc"}
    assert "of" not in metrics["calibration"]
    hparams = read_checkpoint(cnn_run / "checkpoints" / "best.ckpt")["hyper_parameters"]
    assert "num_classes" not in hparams["net"] and hparams.get("class_weight") is None  # earlier checkpoints' arguments


def test_commands_that_move_a_threshold_refuse_a_multiclass_model(four_class, tmp_path: Path) -> None:
    from xray_cls.recalibrate import recalibrate

    root, out, _ = four_class
    ckpt = out / "checkpoints" / "best.ckpt"
    data = ["data=folder", f"data.root={root}", f"data.cache_dir={out / 'cache'}"]
    with pytest.raises(UserInputError, match=r"threshold=0.3 applies to two classes; this model tells 4 apart"):
        evaluate(compose_config(tmp_path / "ev", [*data, f"ckpt={ckpt}", "threshold=0.3"], name="evaluate"))
    with pytest.raises(UserInputError, match=r"threshold=0.3 applies to two classes"):
        predict(compose_config(tmp_path / "pr", [f"ckpt={ckpt}", f"input={root / 'test'}", "threshold=0.3"], name="predict"))
    with pytest.raises(UserInputError, match=r"recalibrate recalibrates the threshold of a two-class model; ckpt=.* tells 4"):
        recalibrate(compose_config(tmp_path / "rc", [*data, f"ckpt={ckpt}"], name="recalibrate"))
    with pytest.raises(UserInputError, match=r"the site protocol\) recalibrates the threshold of a two-class model"):
        evaluate(compose_config(tmp_path / "site", [*data, f"ckpt={ckpt}", "site.calibration_fraction=0.5"], name="evaluate"))
    assert not (tmp_path / "rc" / "recalibrated.ckpt").exists()


@pytest.mark.parametrize(("change", "message"), [
    (lambda h: h["net"].update(num_classes=3), "net.num_classes=3 does not match the 4 class_names of its preprocessing"),
    (lambda h: h["net"].update(num_classes=10**9), "net.num_classes=1000000000 is not an integer from 2 to 64"),
    (lambda h: h.update(class_weight=[1.0, {"_target_": "os.system"}, 1.0, 1.0]), "class_weight is not None or a list of 4 numbers"),
    (lambda h: h["preprocessing"].update(class_names=[f"c{i}" for i in range(65)]), "is not a list of 2 to 64 class names"),
])
def test_a_crafted_multiclass_checkpoint_is_refused(four_class, tmp_path: Path, change, message: str) -> None:
    checkpoint = read_checkpoint(four_class[1] / "checkpoints" / "best.ckpt")
    change(checkpoint["hyper_parameters"])
    write_checkpoint(tmp_path / "crafted.ckpt", checkpoint)
    with pytest.raises(UserInputError, match=message):
        load_classifier(tmp_path / "crafted.ckpt")


def test_the_sweep_report_reads_multiclass_runs_beside_binary_ones(four_class, cnn_run: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "SW"
    for job, run in enumerate((four_class[1], cnn_run)):
        shutil.copytree(run, sweep / str(job), ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "cache"))
        (sweep / str(job) / ".hydra").mkdir(exist_ok=True)
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
    sweep_report.main([str(sweep)])
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["tn"] == "" and rows[0]["threshold"] == "" and rows[1]["tn"] != ""
    assert float(rows[0]["accuracy"]) == pytest.approx(four_class[2]["test"]["accuracy"])
    assert (sweep / "figures" / "confusion_matrices.png").is_file()


def test_balanced_class_weights_make_every_class_weigh_alike() -> None:
    counts = [10, 30, 60]
    weights = class_weights("balanced", counts)
    assert [w * n for w, n in zip(weights, counts)] == pytest.approx([sum(counts) / 3] * 3)
    assert class_weights([1, 2, 3], counts) == [1.0, 2.0, 3.0] and class_weights(None, counts) is None
    with pytest.raises(UserInputError, match=r"loss.class_weight=\[1, -2, 3\] is not valid"):
        class_weights([1, -2, 3], counts)


def test_per_class_scores_follow_the_matrix() -> None:
    matrix = [[5, 1, 0], [2, 6, 2], [0, 0, 4]]  # rows true, columns called
    labels = torch.tensor([k for k, row in enumerate(matrix) for _ in range(sum(row))])
    probs = torch.nn.functional.one_hot(labels, 3).float() * 0.8 + 0.1 / 1.5
    scores = per_class_scores(matrix, probs, labels, ["a", "b", "c"])
    assert scores["b"]["precision"] == pytest.approx(6 / 7) and scores["b"]["recall"] == pytest.approx(6 / 10)
    assert scores["c"]["precision"] == pytest.approx(4 / 6) and scores["c"]["specificity"] == pytest.approx(14 / 16)
    assert [s["support"] for s in scores.values()] == [6, 10, 4]
    assert scores["a"]["f1"] == pytest.approx(2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6))


def test_multiclass_bootstrap_intervals_hold_the_scores() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=generator)
    logits = torch.randn(300, 3, generator=generator) + 2 * torch.nn.functional.one_hot(labels, 3)
    probs = logits.softmax(1)
    intervals = bootstrap_intervals(probs, labels, 0.5, 200, 0.95, seed=1)
    accuracy = (probs.argmax(1) == labels).float().mean().item()
    assert set(intervals) == {"accuracy", "recall", "specificity", "auroc"}
    low, high = intervals["accuracy"]
    assert low < accuracy < high and high - low < 0.2


def test_temperature_scaling_on_the_softmax_cools_overconfident_logits() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = 1.5 * torch.randn(2000, 3, generator=generator)
    labels = torch.multinomial(logits.softmax(1), 1, generator=generator).flatten()  # calibrated at T = 1
    temperature = fit_temperature(4 * logits, labels)  # the same model, four times too confident
    assert temperature == pytest.approx(4, rel=0.15)
    nll = [torch.nn.functional.cross_entropy(4 * logits / t, labels).item() for t in (1, temperature)]
    assert nll[1] < nll[0] and math.isfinite(nll[1])


def test_evaluate_refuses_an_npz_with_more_labels_than_the_checkpoints_classes(cnn_run: Path, three_label_npz: Path,
                                                                               tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"three.npz holds labels up to 2; the checkpoint's classes are 0 \(NORMAL\), 1 \(PNEUMONIA\)"):
        evaluate(compose_config(tmp_path / "ev", [f"ckpt={cnn_run / 'checkpoints' / 'best.ckpt'}", f"data.path={three_label_npz}"],
                                name="evaluate"))
