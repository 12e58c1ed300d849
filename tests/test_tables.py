"""Label tables (data=table) and the presets of the datasets researchers move on to, each on a
small fixture in that dataset's exact layout: RSNA (DICOMs, JPEG Baseline, a row per box), NIH
ChestX-ray14 (its bracketed header, |-separated findings, official split lists, several image
folders) and CheXpert (its path prefix, uncertain and blank labels, lateral views)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray_cls.core.errors import UserInputError
from xray_cls.train import train

from conftest import SHORT_RUN, compose_config

RSNA_HEADER = "patientId,x,y,width,height,Target"
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
                   "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
                   "Fracture,Support Devices")


def pixels(label: int, index: int, size: int = 48) -> np.ndarray:
    """A noisy image whose brightness says its class."""
    rng = np.random.default_rng(index)
    return np.clip(rng.normal(70 + 90 * label, 20, (size, size)), 0, 255).astype(np.uint8)


def write_jpeg_dicom(path: Path, image: np.ndarray) -> None:
    """An 8-bit MONOCHROME2 DICOM with JPEG Baseline compressed pixels, as RSNA ships them."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_rsna(root: Path, n: int = 60) -> dict[str, int]:
    """stage_2_train_images/<id>.dcm, the labels a row per box (blank boxes for negatives), the class info."""
    labels, info = [RSNA_HEADER], ["patientId,class"]
    truth = {}
    for i in range(n):
        pid = f"{i:08x}-1a2b-4c3d-8e9f-{i:012x}"
        kind = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")[i % 3]
        target = int(kind == "Lung Opacity")
        truth[pid] = target
        write_jpeg_dicom(root / "stage_2_train_images" / f"{pid}.dcm", pixels(target, i))
        boxes = 1 + i % 2 if target else 1
        for b in range(boxes):
            labels.append(f"{pid},{100 + b}.0,{200}.0,{50}.0,{80}.0,1" if target else f"{pid},,,,,0")
            info.append(f"{pid},{kind}")
    (root / "stage_2_train_labels.csv").write_text("\n".join(labels) + "\n")
    (root / "stage_2_detailed_class_info.csv").write_text("\n".join(info) + "\n")
    return truth


def write_nih(root: Path, patients: int = 30) -> None:
    """Data_Entry_2017_v2020.csv (its 11 fields a row), images in two images_00N/images folders
    (some RGBA), and the official split lists by patient."""
    rows, train_list, test_list = [NIH_HEADER], [], []
    findings = ["No Finding", "Pneumonia", "Cardiomegaly|Pneumonia", "Effusion"]
    index = 0
    for patient in range(1, patients + 1):
        for follow_up in range(2):
            index += 1
            name = f"{patient:08d}_{follow_up:03d}.png"
            finding = findings[(patient + follow_up) % 4]
            image = pixels(int("Pneumonia" in finding), index)
            folder = root / f"images_{1 + index % 2:03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            if index % 5 == 0:  # 519 of NIH's images are RGBA
                Image.fromarray(np.dstack([image] * 3 + [np.full_like(image, 255)]), "RGBA").save(folder / name)
            else:
                Image.fromarray(image).save(folder / name)
            rows.append(f"{name},{finding},{follow_up},{patient},{40 + patient},M,{'PA' if index % 3 else 'AP'},2500,2048,0.168,0.168")
            (test_list if patient % 5 == 0 else train_list).append(name)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(rows) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train_list) + "\n")
    (root / "test_list.txt").write_text("\n".join(test_list) + "\n")


def chexpert_row(path: str, frontal: bool, pneumonia: str) -> str:
    values = ["Female", "68", "Frontal" if frontal else "Lateral", "AP" if frontal else "", "", "", "", "1.0", "", "", "",
              pneumonia, "", "", "0.0", "", "", "1.0"]
    return ",".join([path, *values])


def write_chexpert(root: Path, patients: int = 30) -> dict[str, int]:
    """CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyN/viewN_*.jpg with train.csv and valid.csv."""
    values = ["1.0", "0.0", "-1.0", ""]
    counts = {v: 0 for v in values}
    for split, first, n in (("train", 1, patients), ("valid", 64541, 8)):
        rows = [CHEXPERT_HEADER]
        for p in range(first, first + n):
            value = values[p % 4] if split == "train" else ("1.0", "0.0")[p % 2]
            for view, frontal in (("view1_frontal", True), ("view2_lateral", False)):
                rel = f"{split}/patient{p:05d}/study1/{view}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels(int(value == "1.0"), p)).save(root / rel, quality=95)
                rows.append(chexpert_row(f"CheXpert-v1.0-small/{rel}", frontal, value))
            if split == "train":
                counts[value] += 1
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return counts


def table_run(tmp_path: Path, *overrides: str) -> dict:
    return train(compose_config(tmp_path / "run", [*SHORT_RUN, "data.image_size=32", "data.batch_size=8", "model=cnn",
                                                   f"data.cache_dir={tmp_path / 'cache'}", *overrides]))


def splits(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "splits.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def assert_patients_apart(rows: list[dict[str, str]]) -> None:
    sides: dict[str, set[str]] = {}
    for row in rows:
        sides.setdefault(row["patient"], set()).add(row["split"])
    assert all(len(s) == 1 for s in sides.values()), [p for p, s in sides.items() if len(s) > 1][:3]


def test_rsna_groups_its_box_rows_and_decodes_jpeg_dicoms(tmp_path: Path) -> None:
    truth = write_rsna(tmp_path / "rsna")
    metrics = table_run(tmp_path, "data=rsna_pneumonia", f"data.root={tmp_path / 'rsna'}")
    rows = splits(tmp_path / "run")
    assert len(rows) == len(truth)  # one row per image, not per box
    assert metrics["class_names"] == ["NO_OPACITY", "LUNG_OPACITY"]
    for row in rows:
        assert row["label"] == ("LUNG_OPACITY" if truth[row["patient"]] else "NO_OPACITY")
        assert row["path"] == f"stage_2_train_images/{row['patient']}.dcm"
    assert {r["split"] for r in rows} == {"train", "val", "test"} and metrics["n_test"] == sum(r["split"] == "test" for r in rows)
    assert_patients_apart(rows)


def test_rsna_three_classes_train_a_softmax(tmp_path: Path) -> None:
    write_rsna(tmp_path / "rsna")
    metrics = table_run(tmp_path, "data=rsna_classes", f"data.root={tmp_path / 'rsna'}")
    assert metrics["class_names"] == ["NORMAL", "NOT_NORMAL", "LUNG_OPACITY"]
    assert len(metrics["confusion_matrix"]["matrix"]) == 3 and sum(map(sum, metrics["confusion_matrix"]["matrix"])) == metrics["n_test"]


def test_nih_reads_its_header_findings_folders_and_official_split(tmp_path: Path) -> None:
    write_nih(tmp_path / "nih")
    metrics = table_run(tmp_path, "data=nih_cxr14", f"data.root={tmp_path / 'nih'}")
    rows = splits(tmp_path / "run")
    assert len(rows) == 60 and metrics["class_names"] == ["NO_PNEUMONIA", "PNEUMONIA"]
    test_names = set((tmp_path / "nih" / "test_list.txt").read_text().split())
    assert {Path(r["path"]).name for r in rows if r["split"] == "test"} == test_names  # the official test list
    entries = {line.split(",")[0]: line.split(",")[1] for line in (tmp_path / "nih" / "Data_Entry_2017_v2020.csv").read_text().splitlines()[1:]}
    for row in rows:
        assert (row["label"] == "PNEUMONIA") == ("Pneumonia" in entries[Path(row["path"]).name].split("|"))
    assert_patients_apart(rows)


def test_nih_view_filter_and_its_older_csv(tmp_path: Path) -> None:
    """Data_Entry_2017.csv: a trailing comma and CRLF line ends; "View Position" keeps PA views only."""
    root = tmp_path / "nih"
    write_nih(root)
    lines = (root / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    (root / "Data_Entry_2017.csv").write_bytes(("\r\n".join(line + "," for line in lines) + "\r\n").encode())
    table_run(tmp_path, "data=nih_cxr14", f"data.root={root}", "data.csv=Data_Entry_2017.csv", "data.filters={View Position: [PA]}")
    pa = {line.split(",")[0] for line in lines[1:] if line.split(",")[6] == "PA"}
    assert {Path(r["path"]).name for r in splits(tmp_path / "run")} == pa


@pytest.mark.parametrize("policy", ["ignore", "zeros", "ones"])
def test_chexpert_uncertainty_policies_frontal_views_and_patients(tmp_path: Path, policy: str) -> None:
    counts = write_chexpert(tmp_path / "CheXpert-v1.0-small")
    metrics = table_run(tmp_path, "data=chexpert", f"data.root={tmp_path / 'CheXpert-v1.0-small'}", f"data.uncertain={policy}")
    rows = splits(tmp_path / "run")
    train_rows = [r for r in rows if r["split"] != "test"]
    assert all("frontal" in r["path"] and r["path"].startswith("train/") for r in train_rows)
    positives = sum(r["label"] == "PNEUMONIA" for r in train_rows)
    expected = {"ignore": counts["1.0"], "zeros": counts["1.0"], "ones": counts["1.0"] + counts["-1.0"]}[policy]
    assert positives == expected  # blank is not mentioned: negative
    assert len(train_rows) == sum(counts.values()) - (counts["-1.0"] if policy == "ignore" else 0)
    assert {r["path"].split("/")[0] for r in rows if r["split"] == "test"} == {"valid"} and metrics["n_test"] == 8
    assert all(r["patient"].startswith("patient") for r in rows)
    assert_patients_apart(rows)


def write_table(root: Path, lines: list[str], images: int = 12) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.fromarray(pixels(i % 2, i)).save(root / f"img{i}.png")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


GENERIC = ["data=table", "data.path_column=file", "data.label_column=finding", "data.patient_column=patient",
           "data.label_values={NORMAL: [no], PNEUMONIA: [yes]}"]


def generic_lines(rows: int = 12) -> list[str]:
    return ["file,finding,patient", *(f"img{i}.png,{('no', 'yes')[i % 2]},p{i // 2}" for i in range(rows))]


@pytest.mark.parametrize(("edit", "overrides", "message"), [
    (lambda lines: [lines[0].replace("patient", "subject"), *lines[1:]], [],
     r"labels.csv: no column 'patient'; expected a header with file, finding, patient, found file, finding, subject"),
    (lambda lines: [*lines, "img3.png,maybe,p1"], [], r"labels.csv row 14: finding='maybe' is no value of a class; expected NORMAL: 'no'"),
    (lambda lines: [*lines, "img13.png,no,p9"], [],
     r"1 of the 13 images the table names are missing \(first: 'img13.png'\); expected them under .*, or data.max_missing >= 0.0769"),
    (lambda lines: [*lines, "img2.png,yes,p1"], [], r"labels.csv rows 4 and 14: img2.png is labeled NORMAL and PNEUMONIA; expected one label"),
    (lambda lines: [*lines, "../outside.png,no,p9"], [], r"the image path '../outside.png' leaves data.root"),
    (lambda lines: lines, ["data.split_files={train: train.txt, test: test.txt}"],
     r"patient 'p0' is in both train and test; expected each patient in one official split"),
])
def test_a_bad_table_is_one_line_naming_file_and_row(tmp_path: Path, edit, overrides: list[str], message: str) -> None:
    root = tmp_path / "data"
    write_table(root, edit(generic_lines()))
    (tmp_path / "outside.png").write_bytes((root / "img0.png").read_bytes())
    (root / "train.txt").write_text("img0.png\nimg2.png\n")
    (root / "test.txt").write_text("img1.png\n")
    with pytest.raises(UserInputError, match=message):
        table_run(tmp_path, *GENERIC, f"data.root={root}", *overrides)


def test_missing_images_within_the_allowed_share_are_left_out(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_table(root, [*generic_lines(), "img13.png,no,p9"])
    table_run(tmp_path, *GENERIC, f"data.root={root}", "data.max_missing=0.1")
    assert len(splits(tmp_path / "run")) == 12


def test_a_table_cross_validates_by_patient(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_table(root, generic_lines(24), images=24)
    table_run(tmp_path, *GENERIC, f"data.root={root}", "data.folds=3", "data.fold=2")
    rows = splits(tmp_path / "run")
    assert {r["fold"] for r in rows if r["split"] == "val"} == {"2"} and {r["fold"] for r in rows if r["split"] == "test"} == {""}
    assert_patients_apart(rows)


def test_a_nul_in_an_image_path_is_one_line_naming_file_and_row(tmp_path: Path) -> None:
    """Found by the fuzzer: os.path.realpath raised ValueError (embedded null byte)."""
    root = tmp_path / "data"
    write_table(root, [*generic_lines(), "img1\x00.png,no,p9"])
    with pytest.raises(UserInputError, match=r"labels.csv row 14: the image path 'img1\\x00.png' holds a NUL character"):
        table_run(tmp_path, *GENERIC, f"data.root={root}")


@pytest.mark.parametrize("boms", [1, 2])
def test_a_split_list_that_starts_with_a_bom_keeps_its_first_image(tmp_path: Path, boms: int) -> None:
    """Found by the fuzzer: the first name read as '\\ufeffimg0.png' and its image was left out as unlisted."""
    root = tmp_path / "data"
    write_table(root, generic_lines(24), images=24)
    (root / "train.txt").write_bytes(b"\xef\xbb\xbf" * boms + "\n".join(f"img{i}.png" for i in range(20)).encode() + b"\n")
    (root / "test.txt").write_text("\n".join(f"img{i}.png" for i in range(20, 24)) + "\n")
    table_run(tmp_path, *GENERIC, f"data.root={root}", "data.split_files={train: train.txt, test: test.txt}")
    assert "img0.png" in {r["path"] for r in splits(tmp_path / "run")}


def test_a_table_too_short_for_a_train_split_is_refused_before_the_run(tmp_path: Path) -> None:
    """Found by the fuzzer: a table cut after its first rows read with an empty train split."""
    root = tmp_path / "data"
    write_table(root, generic_lines(2), images=2)
    with pytest.raises(UserInputError, match=r"^data.csv: .*labels.csv: the train split has no image"):
        table_run(tmp_path, *GENERIC, f"data.root={root}")


def test_a_loop_of_links_in_an_image_path_is_one_line(tmp_path: Path) -> None:
    """Found in review: Path.resolve raised RuntimeError (a symlink loop) on Python 3.11."""
    root = tmp_path / "data"
    write_table(root, [*generic_lines(), "loop/img0.png,no,p9"])
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(UserInputError, match=r"labels.csv row 14: the image path 'loop/img0.png' cannot be a file"):
        table_run(tmp_path, *GENERIC, f"data.root={root}")
