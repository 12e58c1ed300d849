"""Patients: the patient a Kermany file name names, and the splits and folds that keep every image
of a patient on one side, stratified by class."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)


# Kermany file names name the patient: person1946_bacteria_4875.jpeg is patient person1946,
# IM-0115-0001.jpeg is IM-0115 and NORMAL2-IM-1427-0001.jpeg is NORMAL2-IM-1427.
KERMANY_PATIENT = re.compile(r"^(person\d+(?=_)|(?:NORMAL2-)?IM-\d+(?=-))", re.IGNORECASE)


def patient_id(path: Path) -> str | None:
    """The patient a Kermany image file belongs to, or None when its name follows no known pattern."""
    match = KERMANY_PATIENT.match(path.name)
    return match.group(1) if match else None


def patient_split(
    labels: torch.Tensor, patients: list[str], fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): `fraction` of each class's patients in val, every image of a patient
    on the same side, the same for the same seed. A patient counts for the class of most of its
    images; one group per image makes this an image-level stratified split."""
    members, majority = patient_classes(labels, patients)
    values = labels.tolist()
    generator = torch.Generator().manual_seed(seed)
    val: list[int] = []
    for label in sorted(set(values)):
        groups = [g for g in members if majority[g] == label]
        order = torch.randperm(len(groups), generator=generator)
        n_val = max(1, round(fraction * len(groups)))
        val += [i for k in order[:n_val].tolist() for i in members[groups[k]]]
    in_val = torch.zeros(len(labels), dtype=torch.bool)
    in_val[val] = True
    return torch.nonzero(~in_val).flatten(), torch.nonzero(in_val).flatten()


def patient_folds(labels: torch.Tensor, patients: list[str], folds: int, seed: int) -> list[int]:
    """The fold (0 to folds-1) of each image: each class's patients (by the class of most of their
    images) shuffled with `seed` and dealt out in turn, so that every fold holds about 1/folds of
    each class's patients and every image of a patient is in its patient's fold."""
    members, majority = patient_classes(labels, patients)
    values = labels.tolist()
    generator = torch.Generator().manual_seed(seed)
    fold_of = [0] * len(patients)
    for label in sorted(set(values)):
        groups = [g for g in members if majority[g] == label]
        for turn, k in enumerate(torch.randperm(len(groups), generator=generator).tolist()):
            for i in members[groups[k]]:
                fold_of[i] = turn % folds
    return fold_of


def patient_classes(labels: torch.Tensor, patients: list[str]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """(each patient's image indices, in order of first appearance; each patient's class: that of
    most of its images), what patient-level splits and folds deal out."""
    members: dict[str, list[int]] = {}
    for index, patient in enumerate(patients):
        members.setdefault(patient, []).append(index)
    values = labels.tolist()  # plain lists: a torch op per patient cost ~0.1 s at 5,000 images
    return members, {group: majority_label([values[i] for i in index]) for group, index in members.items()}


def majority_label(labels: list[int]) -> int:
    """The most common label; the smallest of a tie, so draws stay those of earlier versions."""
    return max(sorted(set(labels)), key=labels.count)


ONE_IMAGE_GROUP = "image:"


def patient_groups(paths: list[Path] | None) -> list[str]:
    """The patient of each image; an image whose name names no patient is a group of its own."""
    return [patient_id(p) or f"{ONE_IMAGE_GROUP}{p}" for p in paths or []]


def log_patient_overlap(train_groups: list[str], groups: list[str], images: int, name: str) -> None:
    """val (or test) has N images of M patients, and how many of them are in train too (0 for a drawn split)."""
    train_patients, patients = set(train_groups), set(groups)
    shared = len(train_patients & patients)
    (log.warning if shared else log.info)(
        "%s has %d images of %d patients, and %d patients are shared with train", name, images, len(patients), shared
    )
