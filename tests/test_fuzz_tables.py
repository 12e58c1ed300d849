"""Fuzzing the label-table reader with each preset's table, as a run reads it: the CSV (and NIH's
split lists) mutated as text and cell by cell, beside the preset's images."""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import (
    CaseServer,
    assert_handled,
    assert_writes_only_in,
    case_folders,
    data_summary,
    fuzz_cases,
    fuzz_settings,
    is_semantic_noop,
    mutate,
    mutations,
    snapshot,
    text_layout,
)
from test_tables import GENERIC, generic_lines, write_chexpert, write_nih, write_rsna, write_table

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

# preset -> (its overrides, the files a user's copy of the dataset may have damaged)
PRESETS = {
    "table": (GENERIC, ["labels.csv"]),
    "rsna_pneumonia": (["data=rsna_pneumonia"], ["stage_2_train_labels.csv"]),
    "rsna_classes": (["data=rsna_classes"], ["stage_2_detailed_class_info.csv"]),
    "nih_cxr14": (["data=nih_cxr14"], ["Data_Entry_2017_v2020.csv", "train_val_list.txt", "test_list.txt"]),
    "chexpert": (["data=chexpert"], ["train.csv", "valid.csv"]),
}
# What a cell is overwritten with: numbers at the edges, nothing, paths that leave the dataset,
# a NUL, a quote, a very long value.
CELL_VALUES = ["0", "-1", "2147483648", "", "../../outside.png", "/etc/passwd", "a\x00b", '"', "x" * 100_000, "1.0", "-1.0"]
OVERRIDES = ["data.image_size=16", "data.min_val_images=4"]


def write_dataset(preset: str, root: Path) -> None:
    if preset == "table":
        write_table(root, generic_lines(24), images=24)
    elif preset.startswith("rsna"):
        write_rsna(root, 24)
    elif preset == "nih_cxr14":
        write_nih(root, 12)
    else:
        write_chexpert(root, 12)


def linked_copy(template: Path, target: Path) -> None:
    """The dataset's folders and images as hard links (cheap, and inside the case's data.root), its tables as copies."""
    for dirpath, _, files in os.walk(template):
        folder = target / Path(dirpath).relative_to(template)
        folder.mkdir(parents=True, exist_ok=True)
        for name in files:
            source = Path(dirpath) / name
            if source.suffix in (".csv", ".txt"):
                shutil.copyfile(source, folder / name)
            else:
                os.link(source, folder / name)


def with_cell(data: bytes, row: int, column: int, value: str) -> bytes:
    """The CSV with one cell replaced (rows and columns counted modulo the table's)."""
    rows = list(csv.reader(io.StringIO(data.decode("utf-8", errors="replace"))))
    if not rows:
        return data
    cells = rows[row % len(rows)]
    if cells:
        cells[column % len(cells)] = value
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode("utf-8", errors="surrogateescape")


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    found = {}
    for preset in PRESETS:
        root = tmp_path_factory.mktemp(preset) / "dataset"
        write_dataset(preset, root)
        found[preset] = root
    return found


def read(case_server: CaseServer, case: Path, preset: str, root: Path) -> tuple[bool, dict | None, str]:
    before = snapshot(case)
    outcome = case_server.run("case_entries:read_data", [*PRESETS[preset][0], f"data.root={root}", *OVERRIDES], case)
    assert_writes_only_in(before, snapshot(case), case)
    if not assert_handled(outcome):
        return False, None, outcome.stderr
    return True, data_summary(outcome), outcome.stderr


@pytest.fixture(scope="module")
def originals(case_server: CaseServer, templates: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    found = {}
    for preset, template in templates.items():
        case = tmp_path_factory.mktemp(f"original-{preset}")
        linked_copy(template, case / "dataset")
        ok, summary, stderr = read(case_server, case, preset, case / "dataset")
        assert ok, f"{preset}: {stderr[-2000:]}"
        found[preset] = summary
    return found


def test_mutated_tables_are_read_or_refused_in_one_line(case_server: CaseServer, templates: dict[str, Path], originals: dict[str, dict],
                                                        tmp_path: Path, pytestconfig: pytest.Config) -> None:
    folders = case_folders(tmp_path)

    @fuzz_settings(fuzz_cases(pytestconfig, 40))
    @given(data=st.data())
    def one_case(data: st.DataObject) -> None:
        preset = data.draw(st.sampled_from(sorted(PRESETS)), label="preset")
        name = data.draw(st.sampled_from(PRESETS[preset][1]), label="file")
        case = next(folders)
        root = case / "dataset"
        linked_copy(templates[preset], root)
        table = (root / name).read_bytes()
        ops: list[tuple] = []
        if data.draw(st.booleans(), label="a cell"):
            cell = (data.draw(st.integers(0, 10_000)), data.draw(st.integers(0, 20)), data.draw(st.sampled_from(CELL_VALUES)))
            table = with_cell(table, *cell)
        else:
            ops = data.draw(mutations(table, text_layout(table)), label="mutations")
            table = mutate(table, ops)
        (root / name).write_bytes(table)
        (case / "outside.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # what a path leaving data.root would reach
        ok, summary, _ = read(case_server, case, preset, root)
        if ok and ops and is_semantic_noop(ops):
            assert summary == originals[preset]  # a BOM or other line endings: the same table

    one_case()
