"""What a run learns: its classes, in label order, and where each image's class comes from.

`task=pneumonia` (NORMAL vs PNEUMONIA, the class folders) is the default. `task=bacterial_viral`
reads the PNEUMONIA folder only and takes each image's class from its Kermany file name
(`person1946_bacteria_4875.jpeg` is BACTERIAL, `person1661_virus_2872.jpeg` is VIRAL);
`task=normal_bacterial_viral` reads NORMAL by its folder and PNEUMONIA by its file names. With two
classes, the second is the positive class: the one a probability, a threshold, sensitivity and
precision are about. Three or more classes are told apart by a softmax over one logit per class.
A checkpoint records its task (`preprocessing["task"]`), so `evaluate` and `predict` read new data
as the run did; a checkpoint written before tasks existed is `pneumonia`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xray_cls.core.errors import UserInputError

UNKNOWN_CLASS = ("refuse", "skip")  # a file whose class its name cannot tell
MAX_NAME = 64  # characters of a class name or a file-name word
MAX_CLASSES = 64  # a run's classes: each costs a logit, a row of the matrix and a predict column


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]  # label 0, 1, ...
    folders: tuple[str, ...] = ()  # the class folders read; empty: one per class, the class's own
    file_name_words: Mapping[str, str] = field(default_factory=dict)  # class -> the word its file names hold
    unknown: str = "refuse"

    @property
    def class_folders(self) -> tuple[str, ...]:
        return self.folders or self.classes

    @property
    def from_file_names(self) -> bool:
        return bool(self.file_name_words)

    @property
    def binary(self) -> bool:
        """Two classes: one logit and a threshold. Three or more: a softmax and the most probable class."""
        return len(self.classes) == 2

    def folder_label(self, folder: str) -> int | None:
        """The class of every image in `folder`: a class read from its folder, or None when the
        images' file names say it (the folders of the classes in `file_name_words`)."""
        by_folder = [i for i, name in enumerate(self.classes) if name not in self.file_name_words]
        found = [i for i in by_folder if self.classes[i].lower() == folder.lower()]
        if found:
            return found[0]
        if not self.from_file_names:  # a folder per class, in label order
            return self.class_folders.index(folder)
        return None

    def label_from_name(self, path: Path) -> int | None:
        """The class a file's name says (its words split at `_`, `-`, `.` and spaces), or None."""
        words = {w.lower() for w in re.split(r"[_\-.\s]+", path.name)}
        found = [self.classes.index(name) for name, word in self.file_name_words.items() if word.lower() in words]
        return found[0] if len(found) == 1 else None

    def record(self) -> dict[str, Any]:
        """The task as plain data, for a checkpoint."""
        return {"name": self.name, "classes": list(self.classes), "folders": list(self.folders),
                "file_name_words": dict(self.file_name_words), "unknown": self.unknown}


PNEUMONIA = Task("pneumonia", ("NORMAL", "PNEUMONIA"))


def make_task(task: Mapping[str, Any] | None, classes: Sequence[str] | None = None, source: str = "task") -> Task:
    """The Task of a config or a checkpoint's record (`task`; None: a checkpoint from before tasks),
    every field checked: one line names a bad one. `classes` (`data.classes`) replaces the class
    folders of a task read from folders; such a run is the task `folders`."""
    if task is None:
        return PNEUMONIA
    if not isinstance(task, Mapping):
        raise UserInputError(f"{source} is not a task; expected a mapping such as conf/task/pneumonia.yaml")
    words = dict(task.get("file_name_words") or {})
    names, name = list(task.get("classes") or []), str(task.get("name", ""))
    if classes is not None:
        if words:
            raise UserInputError(f"data.classes applies to tasks read from class folders; task={name} reads file names")
        if list(classes) != names:
            names, name = list(classes), "folders"
    check_names("data.classes" if classes is not None else f"{source}.classes", names)
    folders = list(task.get("folders") or [])
    if folders:
        check_names(f"{source}.folders", folders, at_least=1)
    unknown = task.get("unknown", "refuse")
    if unknown not in UNKNOWN_CLASS:
        raise UserInputError(f"{source}.unknown={unknown} is not valid; expected one of {', '.join(UNKNOWN_CLASS)}")
    if words:
        check_words(source, names, folders, words)
    return Task(name, tuple(names), tuple(folders), words, unknown)


def check_words(source: str, names: list[str], folders: list[str], words: dict[str, Any]) -> None:
    """At least two classes read from file names, each with one word; every other class read from
    a folder of its own name."""
    by_folder = [n for n in names if n not in words]
    if not set(words) <= set(names) or len(words) < 2 or not all(isinstance(w, str) and 0 < len(w) <= MAX_NAME for w in words.values()):
        raise UserInputError(f"{source}.file_name_words must give at least two of {', '.join(names)} one word each; got {words}")
    folder_names = {f.lower() for f in folders}
    missing = [n for n in by_folder if n.lower() not in folder_names]
    if missing:
        raise UserInputError(
            f"{source}: the class {missing[0]} has no word in file_name_words and no folder of its name in folders {folders}; "
            "expected each class read from its file names or from its own folder"
        )


def task_of_run(task: Mapping[str, Any], data: Mapping[str, Any]) -> Task:
    """The task a run's config asks for (`task`, and `data.classes` of data=folder), checked against
    its data: only a folder has file names to read classes from."""
    classes = data.get("classes")
    made = make_task(task, list(classes) if classes is not None else None)
    if not str(data.get("_target_", "")).endswith("ImageFolderDataModule"):  # an .npz or a label table: labels are classes
        check_labels_are_classes(made)
    return made


def check_labels_are_classes(task: Task) -> None:
    """A dataset without file names or folders (a MedMNIST .npz) can only serve a task whose
    classes are its labels."""
    if task.from_file_names or task.folders:
        raise UserInputError(
            f"task={task.name} reads the class of each image from its file name; a MedMNIST .npz has none "
            "(its labels are its classes); expected data=folder with a Kermany folder"
        )


def check_names(option: str, names: list[Any], at_least: int = 2) -> None:
    """Folder and class names: short strings, no path separators, different in any case."""
    ok = all(isinstance(n, str) and 0 < len(n) <= MAX_NAME and "/" not in n for n in names)
    if not ok or len({n.lower() for n in names if isinstance(n, str)}) != len(names) or not at_least <= len(names) <= MAX_CLASSES:
        raise UserInputError(f"{option}={names} is not valid; expected {at_least} to {MAX_CLASSES} different class names")
