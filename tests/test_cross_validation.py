"""Patient-grouped cross-validation: data.folds / data.fold split train into folds by patient,
`+experiment=cv` runs them as one multirun, and the sweep report gives each configuration's
mean and spread over its folds."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from xray_cls.core.errors import UserInputError
from xray_cls.data import ImageFolderDataModule
from xray_cls.data.patients import patient_groups

from conftest import SHORT_RUN, run_cli, write_kermany_named_folder


@pytest.fixture(scope="module")
def named_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cv") / "kermany"
    write_kermany_named_folder(root)
    return root


def fold_split(root: Path, fold: int, **options: object) -> ImageFolderDataModule:
    data = ImageFolderDataModule(root=str(root), image_size=16, cache_dir=None, folds=3, fold=fold, **options)
    data.setup("fit")
    return data


def patients(data: ImageFolderDataModule, split: str) -> set[str]:
    return set(patient_groups(data.splits[split].paths))


def test_the_val_folds_partition_trains_patients_by_class(named_root: Path) -> None:
    folds = [fold_split(named_root, i) for i in range(3)]
    everyone = patients(folds[0], "train") | patients(folds[0], "val")
    vals = [patients(data, "val") for data in folds]
    assert all(not a & b for i, a in enumerate(vals) for b in vals[i + 1:])  # disjoint
    assert set().union(*vals) == everyone  # together, every train patient once
    for data, val in zip(folds, vals):
        assert not patients(data, "train") & val
        assert set(data.splits["val"].labels.tolist()) == {0, 1}  # stratified: both classes in every fold
        assert [str(p) for p in data.splits["test"].paths] == [str(p) for p in folds[0].splits["test"].paths]
    assert patients(fold_split(named_root, 0, seed=7), "val") == vals[0]  # the run seed leaves the folds alone
    assert patients(fold_split(named_root, 0, fold_seed=1), "val") != vals[0]


def test_a_fold_outside_the_folds_is_one_line(named_root: Path) -> None:
    with pytest.raises(UserInputError, match=r"data.fold=3 is not valid; expected an integer from 0 to 2 \(data.folds=3\)"):
        ImageFolderDataModule(root=str(named_root), folds=3, fold=3)


@pytest.mark.slow  # a three-run multirun through the CLI
def test_experiment_cv_reports_the_mean_and_spread_over_the_folds(named_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "+experiment=cv", f"data.root={named_root}", "data.folds=3", "data.fold=0,1,2", "data.image_size=16",
                      "model=mlp", *SHORT_RUN, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (sweep / "report.md").read_text()
    section = report[report.index("## Cross-validation"):]
    row = next(line for line in section.splitlines() if line.startswith("| all runs |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0, 1, 2" and all("±" in c for c in cells[2:])
    with (sweep / "summary.csv").open() as f:
        accuracies = [float(r["accuracy"]) for r in csv.DictReader(f)]
    mean = float(cells[5].split(" ± ")[0])  # test accuracy
    assert mean == pytest.approx(sum(accuracies) / 3, abs=1e-4)
    for job in range(3):
        with (sweep / str(job) / "splits.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert {r["fold"] for r in rows if r["split"] == "val"} == {str(job)}
        assert {r["fold"] for r in rows if r["split"] == "train"} == {"0", "1", "2"} - {str(job)}
        assert {r["fold"] for r in rows if r["split"] == "test"} == {""}
