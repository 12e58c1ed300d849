"""Reading files that someone may have sent: a sweep folder's overrides, metrics and curves.

Everything here treats a file as data from a stranger. A file is read only when it is a regular
file (not a symbolic link, a FIFO or a device) and no larger than a bound; YAML may hold plain
strings only (no tags, no aliases, so no object is built and no alias bomb expands), and its text
is never resolved as an OmegaConf interpolation; JSON may nest only so deep. A file that breaks
a rule raises `UnreadableFile`, one line naming it and the rule. What comes out of such a file
and goes into Markdown or a plot is escaped, so that it shows as the text it is.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from xray_cls.core.errors import UserInputError

MAX_TEXT_BYTES = 4 * 2**20  # a run's metrics.json is about 10 KB, its curves.csv a few KB
MAX_JSON_DEPTH = 32  # metrics.json nests 4 deep
MAX_LIST_ITEMS = 10_000
CURVES_FILE = "curves.csv"  # a run's curves, one row per epoch: written by training.loggers.EpochCurves, read by the sweep report


class UnreadableFile(UserInputError):
    """A received file that is not what it should be; the message names it and why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def read_text(path: Path, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of the regular file `path`, refused when it is a link, not a regular file,
    larger than `max_bytes` or not UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        reason = "is a symbolic link; only regular files are read" if os.path.islink(path) else (err.strerror or str(err))
        raise UnreadableFile(path, reason) from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnreadableFile(path, "is not a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnreadableFile(path, f"is larger than {max_bytes:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnreadableFile(path, "is not UTF-8 text") from None


def read_string_list(path: Path, max_items: int = MAX_LIST_ITEMS) -> list[str]:
    """A YAML file that holds one list of plain strings (Hydra's overrides.yaml), as raw text.

    The file is read as YAML events, not loaded: a tag (`!!python/object`), an alias (`*a`) or
    any nested structure makes it unreadable before anything is built, and `${...}` stays text.
    """
    text = read_text(path)
    expected = "expected a YAML list of plain strings"
    items: list[str] = []
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.StreamStartEvent, yaml.StreamEndEvent, yaml.DocumentStartEvent, yaml.DocumentEndEvent)):
                continue
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise UnreadableFile(path, f"holds a YAML alias or anchor; {expected}")
            if getattr(event, "tag", None) not in (None, "tag:yaml.org,2002:str", "tag:yaml.org,2002:seq"):
                raise UnreadableFile(path, f"holds the YAML tag {str(event.tag)[:80]!r}; {expected}")
            if isinstance(event, yaml.SequenceStartEvent) and depth == 0 and not items:
                depth = 1
            elif isinstance(event, yaml.SequenceEndEvent) and depth == 1:
                depth = 2  # the list is closed: nothing may follow
            elif isinstance(event, yaml.ScalarEvent) and depth == 1:
                if len(items) == max_items:
                    raise UnreadableFile(path, f"holds more than {max_items:,} items")
                items.append(event.value)
            else:
                raise UnreadableFile(path, expected)
    except yaml.YAMLError as err:
        raise UnreadableFile(path, f"is not valid YAML ({' '.join(str(err).split())[:160]})") from None
    if depth != 2:
        raise UnreadableFile(path, expected)
    return items


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def read_json(path: Path, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON file, its nesting depth checked before it is parsed."""
    text = read_text(path)
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub('""', text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > max_depth:
            raise UnreadableFile(path, f"nests deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except ValueError as err:
        raise UnreadableFile(path, f"is not valid JSON ({err})") from None


def value_at(data: Any, path: Path, *keys: str, kind: type | tuple[type, ...] = (int, float), optional: bool = False) -> Any:
    """data[keys[0]][keys[1]]...: a value of `kind` (bool is never a number), else UnreadableFile."""
    value = data
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None and optional:
        return None
    numbers = kind in ((int, float), float)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        wanted = "a number" if numbers else _KIND_NAMES.get(kind, f"a {getattr(kind, '__name__', kind)}")
        raise UnreadableFile(path, f"{'.'.join(keys)} is not {wanted}")
    return value


_KIND_NAMES = {int: "a whole number", str: "a string", list: "a list", dict: "a mapping", bool: "true or false"}


def one_line(text: str, limit: int = 300) -> str:
    """`text` with every run of whitespace (newlines too) as one space, cut to `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Inline Markdown that could format, link or embed; the text never starts a line, so block syntax
# (#, -, +, >) cannot apply, and < > & become entities (no HTML).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]!|~])")


def markdown_text(text: str) -> str:
    """`text` as Markdown that shows it literally: no link, image, emphasis or HTML, on one line."""
    text = one_line(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def markdown_code(text: str) -> str:
    """`text` as a Markdown code span that survives inside a table row, or as `markdown_text` when
    it holds a backtick, <, > or & (which renderers that are not CommonMark may still act on)."""
    text = one_line(text)
    if re.search(r"[`<>&]", text):
        return markdown_text(text)
    return "`" + text.replace("|", "\\|") + "`"


def plot_text(text: str, limit: int = 60) -> str:
    """`text` for a matplotlib label: `$` would start mathtext, which parses (and can fail on) it."""
    return one_line(text, limit).replace("$", r"\$")


MAX_EPOCHS_IN_CURVES = 100_000



def read_epoch_curves(path: Path) -> dict[int, dict[str, float]]:
    """curves.csv as {epoch (from 1): {metric: value}}, empty cells left out. The file may come
    from a copied sweep folder: anything but an epoch number and numbers in its cells raises
    `untrusted.UnreadableFile` naming the file and the row."""
    rows: dict[int, dict[str, float]] = {}
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    if reader.fieldnames is None or "epoch" not in reader.fieldnames:
        raise UnreadableFile(path, "has no epoch column; expected the curves.csv an xray_cls run writes")
    for line, row in enumerate(reader, start=2):
        try:
            epoch = int(row.pop("epoch"))
            values = {str(k): float(v) for k, v in row.items() if v not in ("", None)}
        except (TypeError, ValueError):
            raise UnreadableFile(path, f"row {line} holds something other than an epoch number and numbers") from None
        if not 0 < epoch <= MAX_EPOCHS_IN_CURVES:
            raise UnreadableFile(path, f"row {line} has epoch {epoch}; expected 1 to {MAX_EPOCHS_IN_CURVES:,}")
        rows[epoch] = values
    return rows
