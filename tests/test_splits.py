"""Patient-level val splits of Kermany folders, splits.csv, and `evaluate` on the run's own split."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from xray_cls.data import ImageFolderDataModule, patient_id, patient_split
from xray_cls.train import train

from conftest import SHORT_RUN, compose_config, write_image
from test_evaluate import evaluate_in

# Kermany file names: NORMAL patients IM-xxxx and NORMAL2-IM-xxxx, PNEUMONIA patients personN.
NORMAL_PATIENTS = {f"IM-{i:04d}": 1 + i % 3 for i in range(10)} | {f"NORMAL2-IM-{i:04d}": 2 for i in range(4)}
PNEUMONIA_PATIENTS = {f"person{i}": 1 + i % 4 for i in range(16)}


def kermany_file_names(patients: dict[str, int], label: int) -> list[str]:
    if label == 0:
        return [f"{p}-{k + 1:04d}" for p, n in patients.items() for k in range(n)]
    kinds = ("bacteria", "virus")
    return [f"{p}_{kinds[k % 2]}_{100 * k + i}" for i, (p, n) in enumerate(patients.items()) for k in range(n)]


@pytest.fixture(scope="module")
def patient_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ named as Kermany names its files (several images per patient), test/, no val/."""
    root = tmp_path_factory.mktemp("kermany_patients")
    index = 0
    for split, class_name, label, names in [
        ("train", "NORMAL", 0, kermany_file_names(NORMAL_PATIENTS, 0)),
        ("train", "PNEUMONIA", 1, kermany_file_names(PNEUMONIA_PATIENTS, 1)),
        ("test", "NORMAL", 0, [f"IM-9{i:03d}-0001" for i in range(6)]),
        ("test", "PNEUMONIA", 1, [f"person9{i}_virus_1" for i in range(8)]),
    ]:
        folder = root / split / class_name
        folder.mkdir(parents=True)
        for name in names:
            write_image(folder / name, label, index)
            index += 1
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root


def test_patient_ids_follow_the_kermany_file_names() -> None:
    assert patient_id(Path("person1946_bacteria_4875.jpeg")) == "person1946"
    assert patient_id(Path("IM-0115-0001.jpeg")) == "IM-0115"
    assert patient_id(Path("NORMAL2-IM-1427-0001.jpeg")) == "NORMAL2-IM-1427"
    assert patient_id(Path("img_001.png")) is None
    assert patient_id(Path("person12.jpeg")) is None  # no image suffix after the id: not the pattern


def test_patient_split_keeps_every_patient_on_one_side() -> None:
    patients = [f"p{i // 3}" for i in range(60)]  # 20 patients of 3 images
    labels = torch.tensor([int(i >= 30) for i in range(60)])  # p0-p9 NORMAL, p10-p19 PNEUMONIA
    train_index, val_index = patient_split(labels, patients, 0.2, seed=0)
    train_patients = {patients[i] for i in train_index.tolist()}
    val_patients = {patients[i] for i in val_index.tolist()}
    assert train_patients.isdisjoint(val_patients)
    assert len(val_patients) == 4 and len(val_index) == 12  # 20% of each class's 10 patients, all images
    assert torch.bincount(labels[val_index]).tolist() == [6, 6]
    assert sorted(train_index.tolist() + val_index.tolist()) == list(range(60))


def test_folder_val_split_is_drawn_by_patient(patient_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    dm = ImageFolderDataModule(root=str(patient_root), image_size=16, val_fraction=0.25, seed=5)
    with caplog.at_level(logging.INFO, logger="xray_cls.data"):
        dm.setup()
    by_split = {name: {patient_id(p) for p in split.paths} for name, split in dm.splits.items()}
    assert by_split["train"].isdisjoint(by_split["val"])
    n_normal, n_pneumonia = len(NORMAL_PATIENTS), len(PNEUMONIA_PATIENTS)
    assert len(by_split["val"]) == round(0.25 * n_normal) + round(0.25 * n_pneumonia)
    n_val = len(dm.splits["val"])
    assert f"val has {n_val} images of {len(by_split['val'])} patients, and 0 patients are shared with train" in caplog.text


def test_an_existing_val_folder_reports_the_patients_it_shares(patient_root: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "data"
    root.mkdir()
    for split in ("train", "test"):
        (root / split).symlink_to(patient_root / split)
    leaked = root / "val" / "PNEUMONIA"
    leaked.mkdir(parents=True)
    (root / "val" / "NORMAL").mkdir()
    write_image(leaked / "person3_virus_999", 1, 7)  # person3 has train images too
    write_image(root / "val" / "NORMAL" / "IM-7777-0001", 0, 8)
    dm = ImageFolderDataModule(root=str(root), image_size=16, min_val_images=2)
    with caplog.at_level(logging.INFO, logger="xray_cls.data"):
        dm.setup()
    assert "val has 2 images of 2 patients, and 1 patients are shared with train" in caplog.text


@pytest.fixture(scope="module")
def train_only_root(patient_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Kaggle train folder as redistributed: train/ alone, no val/ or test/."""
    root = tmp_path_factory.mktemp("train_only")
    (root / "train").symlink_to(patient_root / "train")
    return root


def test_a_root_with_train_alone_gets_a_development_test_drawn_by_patient(train_only_root: Path) -> None:
    """The test patients are the same for every run seed; val is drawn from the rest, by the run's seed."""
    drawn = {}
    for seed in (1, 2):
        dm = ImageFolderDataModule(root=str(train_only_root), image_size=16, val_fraction=0.25, test_fraction=0.25, seed=seed)
        dm.setup()
        drawn[seed] = {name: {patient_id(p) for p in split.paths} for name, split in dm.splits.items()}
        on_disk = [f for f in (train_only_root / "train").resolve().rglob("*") if f.is_file() and not f.name.startswith(".")]
        assert sum(len(split) for split in dm.splits.values()) == len(on_disk)
        patients = drawn[seed]
        assert patients["train"].isdisjoint(patients["val"] | patients["test"]) and patients["val"].isdisjoint(patients["test"])
        assert len(patients["test"]) == round(0.25 * len(NORMAL_PATIENTS)) + round(0.25 * len(PNEUMONIA_PATIENTS))
    assert drawn[1]["test"] == drawn[2]["test"]
    assert drawn[1]["val"] != drawn[2]["val"]


def test_evaluate_rebuilds_the_development_test_the_run_recorded(train_only_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(compose_config(run_dir, ["data=folder", f"data.root={train_only_root}", "data.image_size=16", "data.val_fraction=0.25",
                                   "data.test_fraction=0.25", f"data.cache_dir={tmp_path / 'cache'}", "model=mlp", *SHORT_RUN]))
    test_paths = [r["path"] for r in read_splits_csv(run_dir) if r["split"] == "test"]
    run = json.loads((run_dir / "metrics.json").read_text())
    assert run["n_test"] == len(test_paths) > 0
    # another test_seed would draw other patients: the checkpoint's record wins
    metrics = evaluate_in(tmp_path / "eval", run_dir / "checkpoints" / "best.ckpt", "data=folder", f"data.root={train_only_root}",
                          "data.test_seed=7", f"data.cache_dir={tmp_path / 'cache'}")
    assert metrics["confusion_matrix"] == run["confusion_matrix"]
    redrawn = ImageFolderDataModule(root=str(train_only_root), image_size=16, test_fraction=0.25, test_seed=7)
    redrawn.setup()
    assert {p.relative_to(train_only_root).as_posix() for p in redrawn.splits["test"].paths} != set(test_paths)


@pytest.fixture(scope="module")
def folder_run(patient_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("folder_run")
    cache = run_dir.parent / "cache"
    train(compose_config(run_dir, ["data=folder", f"data.root={patient_root}", "data.image_size=16",
                                   "data.val_fraction=0.25", f"data.cache_dir={cache}", "model=mlp", *SHORT_RUN]))
    return run_dir


def read_splits_csv(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "splits.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_writes_the_split_it_used(folder_run: Path, patient_root: Path) -> None:
    rows = read_splits_csv(folder_run)
    on_disk = sorted(p.relative_to(patient_root).as_posix() for p in patient_root.rglob("*.*") if not p.name.startswith("."))
    assert sorted(row["path"] for row in rows) == on_disk  # every image once, relative to data.root
    for row in rows:
        assert (patient_root / row["path"]).is_file()
        assert row["label"] == Path(row["path"]).parent.name
        assert row["patient"] == patient_id(Path(row["path"]))
    patients = {split: {r["patient"] for r in rows if r["split"] == split} for split in ("train", "val", "test")}
    assert patients["val"] and patients["train"].isdisjoint(patients["val"])
    metrics = json.loads((folder_run / "metrics.json").read_text())
    assert metrics["n_test"] == sum(r["split"] == "test" for r in rows)


def test_bundled_runs_list_their_splits_by_npz_row(mlp_run: Path) -> None:
    rows = read_splits_csv(mlp_run)
    assert len(rows) == 4708 + 524 + 624
    assert rows[0] == {"path": "train_images[0]", "split": "train", "label": rows[0]["label"], "patient": ""}


def test_evaluate_split_val_uses_the_runs_recorded_split(folder_run: Path, patient_root: Path, tmp_path: Path) -> None:
    """Another seed would draw another val split; the checkpoint's record wins."""
    val_paths = [r["path"] for r in read_splits_csv(folder_run) if r["split"] == "val"]
    ckpt = folder_run / "checkpoints" / "best.ckpt"
    metrics = evaluate_in(tmp_path, ckpt, "data=folder", f"data.root={patient_root}", "split=val", "seed=123",
                          f"data.cache_dir={tmp_path / 'cache'}")
    assert metrics["n_test"] == len(val_paths)
    redrawn = ImageFolderDataModule(root=str(patient_root), image_size=16, val_fraction=0.25, seed=123)
    redrawn.setup()
    assert {p.relative_to(patient_root).as_posix() for p in redrawn.splits["val"].paths} != set(val_paths)


def test_evaluate_split_val_on_another_folder_is_refused(folder_run: Path, tmp_path: Path) -> None:
    from xray_cls.core.errors import UserInputError

    from conftest import make_kermany_folder

    other = make_kermany_folder(tmp_path / "other")
    with pytest.raises(UserInputError, match="holds none of the .* val images the checkpoint's run recorded"):
        evaluate_in(tmp_path / "out", folder_run / "checkpoints" / "best.ckpt", "data=folder", f"data.root={other}",
                    "split=val", f"data.cache_dir={tmp_path / 'cache'}")


@pytest.mark.parametrize("layout", ["test_only", "class_folders_only"])
def test_evaluate_needs_only_the_images_it_evaluates(folder_run: Path, patient_root: Path, tmp_path: Path,
                                                    layout: str) -> None:
    root = tmp_path / "data"
    if layout == "test_only":
        root.mkdir()
        (root / "test").symlink_to(patient_root / "test")
    else:
        root.symlink_to(patient_root / "test")
    metrics = evaluate_in(tmp_path / "out", folder_run / "checkpoints" / "best.ckpt", "data=folder", f"data.root={root}",
                          f"data.cache_dir={tmp_path / 'cache'}")
    assert metrics["n_test"] == 14
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 14
