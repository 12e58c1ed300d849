"""Tasks: which classes a run learns and where each image's class comes from (conf/task/,
data.classes), through training, evaluate, predict and the checkpoint."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from xray_cls.core.checkpoint_files import write_checkpoint
from xray_cls.core.errors import UserInputError
from xray_cls.core.task import PNEUMONIA, make_task
from xray_cls.evaluate import evaluate
from xray_cls.models.checkpoints import load_classifier, read_checkpoint
from xray_cls.predict import predict
from xray_cls.train import train

from conftest import SHORT_RUN, compose_config, write_image, write_kermany_named_folder


@pytest.fixture(scope="module")
def kermany_named(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, int]]]:
    root = tmp_path_factory.mktemp("kermany_named")
    return root, write_kermany_named_folder(root)


def folder_run(tmp_path: Path, root: Path, *overrides: str) -> dict:
    return train(compose_config(tmp_path, [*SHORT_RUN, "data=folder", f"data.root={root}", "data.image_size=32",
                                           "data.batch_size=8", f"data.cache_dir={tmp_path / 'cache'}", *overrides]))


@pytest.fixture(scope="module")
def bacterial_viral_run(tmp_path_factory: pytest.TempPathFactory, kermany_named: tuple[Path, dict]) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bacterial_viral_run")
    return out, folder_run(out, kermany_named[0], "task=bacterial_viral", "model=resnet")


def test_bacterial_viral_learns_the_pneumonia_images_labeled_by_their_names(bacterial_viral_run, kermany_named) -> None:
    out, metrics = bacterial_viral_run
    counts = kermany_named[1]["test"]
    assert metrics["class_names"] == ["VIRAL", "BACTERIAL"] and metrics["positive_class"] == "BACTERIAL"
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]["matrix"]
    assert tn + fp + fn + tp == metrics["n_test"] == counts["VIRAL"] + counts["BACTERIAL"]  # no NORMAL image
    assert (fn + tp, tn + fp) == (counts["BACTERIAL"], counts["VIRAL"])
    with open(out / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["label"] for r in rows} == {"VIRAL", "BACTERIAL"}
    assert all("/PNEUMONIA/" in f"/{r['path']}" for r in rows)
    for row in rows:  # each label is the one its file name says
        assert row["label"] == ("BACTERIAL" if "_bacteria_" in row["path"] else "VIRAL")
    by_split = {}
    for row in rows:  # patient-level: no patient on both sides of train and val
        by_split.setdefault(row["split"], set()).add(row["patient"])
    assert by_split["val"] and not by_split["train"] & by_split["val"]


def test_a_task_is_kept_in_the_checkpoint_and_used_by_evaluate_and_predict(bacterial_viral_run, kermany_named, tmp_path) -> None:
    out, metrics = bacterial_viral_run
    ckpt = out / "checkpoints" / "best.ckpt"
    task = read_checkpoint(ckpt)["hyper_parameters"]["preprocessing"]["task"]
    assert make_task(task).name == "bacterial_viral" and task["folders"] == ["PNEUMONIA"]
    evaluated = evaluate(compose_config(tmp_path / "ev", ["data=folder", f"data.root={kermany_named[0]}", f"ckpt={ckpt}",
                                                          f"data.cache_dir={tmp_path / 'cache'}"], name="evaluate"))
    assert evaluated["confusion_matrix"] == metrics["confusion_matrix"]
    csv_path = predict(compose_config(tmp_path / "pr", [f"ckpt={ckpt}", f"input={kermany_named[0] / 'test'}"], name="predict"))
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert "probability_bacterial" in rows[0] and {r["predicted_label"] for r in rows} <= {"VIRAL", "BACTERIAL"}
    assert len(rows) == sum(kermany_named[1]["test"].values())  # predict reads any image: NORMAL's too


def test_evaluate_refuses_a_folder_without_the_tasks_class_folders(bacterial_viral_run, tmp_path) -> None:
    other = tmp_path / "other"
    for name in ("NORMAL", "COVID"):
        (other / "test" / name).mkdir(parents=True)
        write_image(other / "test" / name / "a", 0, 1)
    ckpt = bacterial_viral_run[0] / "checkpoints" / "best.ckpt"
    with pytest.raises(UserInputError, match=r"has no PNEUMONIA folder; expected the class folders PNEUMONIA"):
        evaluate(compose_config(tmp_path / "ev", ["data=folder", f"data.root={other}", f"ckpt={ckpt}"], name="evaluate"))


def test_a_file_whose_name_tells_no_class_is_refused_or_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "data"
    counts = write_kermany_named_folder(root, extra=["person900_scan_1"])
    with pytest.raises(UserInputError, match=r"person900_scan_1\.\w+: its name says no class of task=bacterial_viral \(1 such file"):
        folder_run(tmp_path / "a", root, "task=bacterial_viral")
    with caplog.at_level(logging.WARNING):
        metrics = folder_run(tmp_path / "b", root, "task=bacterial_viral", "task.unknown=skip")
    assert "skipped 1 file(s) whose names hold neither 'virus' (VIRAL) or 'bacteria' (BACTERIAL)" in caplog.text
    assert metrics["n_test"] == counts["test"]["VIRAL"] + counts["test"]["BACTERIAL"]


def test_data_classes_reads_any_two_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for split, n in (("train", 24), ("test", 10)):
        for label, name in enumerate(("Normal", "Viral Pneumonia")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                write_image(root / split / name / f"{name.split()[0]}-{i}", label, i)
    metrics = folder_run(tmp_path / "run", root, "data.classes=[Normal,'Viral Pneumonia']")
    assert metrics["class_names"] == ["Normal", "Viral Pneumonia"] and metrics["positive_class"] == "Viral Pneumonia"
    assert metrics["n_test"] == 20 and sum(metrics["confusion_matrix"]["matrix"][1]) == 10
    csv_path = predict(compose_config(tmp_path / "pr", [f"ckpt={tmp_path / 'run/checkpoints/best.ckpt'}", f"input={root / 'test'}"],
                                      name="predict"))
    assert "probability_viral_pneumonia" in csv_path.read_text().splitlines()[0]


@pytest.mark.parametrize(("overrides", "message"), [
    (["task=bacterial_viral"], "task=bacterial_viral reads the class of each image from its file name; a MedMNIST .npz has none"),
    (["data=folder", "data.root=.", "data.classes=[a]"], r"data.classes=\['a'\] is not valid; expected 2 to 64 different class names"),
    (["data=folder", "data.root=.", "data.classes=[a,A]"], "expected 2 to 64 different class names"),
    (["data=folder", "data.root=.", "task=normal_bacterial_viral", "threshold_rule=youden"],
     "threshold_rule=youden chooses a threshold for two classes; this task has 3, and each image is called its most probable"),
    (["data=folder", "data.root=.", "task=normal_bacterial_viral", "loss.pos_weight=balanced"],
     "loss.pos_weight=balanced weighs the positive class of two; this task has 3 classes: expected loss.class_weight"),
    (["data=folder", "data.root=.", "task=normal_bacterial_viral", "loss.class_weight=[1,2]"],
     r"loss.class_weight=\[1, 2\] is not valid; expected null, balanced or a list of 3 positive numbers"),
    (["loss.class_weight=balanced"], "loss.class_weight=balanced weighs three or more classes; this task has two"),
    (["task=bacterial_viral", "data=folder", "data.root=.", "data.classes=[a,b]"],
     "data.classes applies to tasks read from class folders; task=bacterial_viral reads file names"),
    (["task.unknown=maybe"], "task.unknown=maybe is not valid; expected one of refuse, skip"),
])
def test_a_bad_task_is_refused_in_one_line(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        train(compose_config(tmp_path, [*SHORT_RUN, *overrides]))


def test_a_checkpoint_from_before_tasks_loads_as_pneumonia(cnn_run: Path, tmp_path: Path) -> None:
    checkpoint = read_checkpoint(cnn_run / "checkpoints" / "best.ckpt")
    del checkpoint["hyper_parameters"]["preprocessing"]["task"]
    write_checkpoint(tmp_path / "old.ckpt", checkpoint)
    module = load_classifier(tmp_path / "old.ckpt")
    assert module.hparams.preprocessing["task"] == PNEUMONIA.record()
    expected = json.loads((cnn_run / "metrics.json").read_text())["confusion_matrix"]
    evaluated = evaluate(compose_config(tmp_path / "ev", [f"ckpt={tmp_path / 'old.ckpt'}"], name="evaluate"))
    assert evaluated["confusion_matrix"] == expected


@pytest.mark.parametrize(("task", "message"), [
    ({"name": "x", "classes": ["A", "B"], "folders": [], "file_name_words": {"A": ["a"], "B": "b"}, "unknown": "refuse"},
     "file_name_words is not a mapping of class names to words"),
    ({"name": "x", "classes": ["A", "B"]}, "is not a task record"),
    ({"name": "x", "classes": ["NORMAL", "B/../../etc"], "folders": [], "file_name_words": {}, "unknown": "refuse"},
     "is not valid; expected 2 to 64 different class names"),
])
def test_a_crafted_task_record_is_refused(cnn_run: Path, tmp_path: Path, task: dict, message: str) -> None:
    checkpoint = read_checkpoint(cnn_run / "checkpoints" / "best.ckpt")
    checkpoint["hyper_parameters"]["preprocessing"]["task"] = task
    write_checkpoint(tmp_path / "crafted.ckpt", checkpoint)
    with pytest.raises(UserInputError, match=message):
        load_classifier(tmp_path / "crafted.ckpt")


def test_names_say_the_class_by_whole_words() -> None:
    task = make_task({"name": "bacterial_viral", "classes": ["VIRAL", "BACTERIAL"], "folders": ["PNEUMONIA"],
                      "file_name_words": {"VIRAL": "virus", "BACTERIAL": "bacteria"}, "unknown": "refuse"})
    assert [task.label_from_name(Path(n)) for n in (
        "person1946_bacteria_4875.jpeg", "person1661_virus_2872.jpeg", "person1_viruses_1.jpeg", "person2_bacteria_virus_3.png",
    )] == [1, 0, None, None]
