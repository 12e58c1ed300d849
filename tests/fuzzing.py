"""The mutation fuzzer of every reader a user can point at a file (`pytest -m fuzz`).

Each case starts from a valid fixture, applies a few seeded mutations drawn by Hypothesis (bit
flips, truncation, header fields overwritten with 0, -1 and 2^31, repeated or missing chunks, a
BOM, other line endings, an empty file, and structure-aware changes per format), and runs the
command that reads it in a child process of `fuzz_server.py`, under an address-space limit and a
time limit. A case passes when the command
- exits 0 and its result is correct (the reader's own check), or
- exits 2 with exactly one `error:` line on stderr,
and in either case prints no traceback, is not killed by a limit, and writes nothing outside its
output folder (and the decode cache, where the reader has one).

`--fuzz-cases N` sets the cases per reader (CI runs a few dozen; a long run 10,000), and
`--hypothesis-seed` another seed (docs/development.md). Failures shrink to the smallest mutation list.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

ADDRESS_SPACE_MB = 3 * 1024  # what a case may map beyond the server's own imports
HEADER_VALUES = (0, -1, 2**31, 2**31 - 1, 2**32 - 1, 1)  # what a header field is overwritten with
BOM = b"\xef\xbb\xbf"
TESTS = Path(__file__).parent


# --- running cases ---


@dataclass
class Outcome:
    exit: int | None
    signal: int | None
    timed_out: bool
    seconds: float
    max_rss_mb: float
    stdout: str
    stderr: str

    def describe(self) -> str:
        how = f"exit {self.exit}" if self.exit is not None else f"killed by signal {self.signal}"
        return f"{how}{' (time limit)' if self.timed_out else ''} in {self.seconds:.1f} s\nstderr:\n{self.stderr[-3000:]}"


class CaseServer:
    """One `fuzz_server.py` process, started once per test module, that forks a child per case."""

    def __init__(self, preload: tuple[str, ...] = ("case_entries",)) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg"}
        self.process = subprocess.Popen([sys.executable, str(TESTS / "fuzz_server.py"), *preload], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=TESTS)
        ready = self.process.stdout.readline()
        if not ready:
            raise RuntimeError("the fuzz case server did not start")
        self.exits: Counter[int | None] = Counter()  # exit statuses of the cases run, printed at the end

    def run(self, module: str, args: list[str], case: Path, timeout: float = 60.0, env: dict[str, str] | None = None) -> Outcome:
        """`python -m module args` in `case` (its own HOME, cache and TMPDIR there; `env` added)."""
        home = case / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "TMPDIR": str(home), "MPLCONFIGDIR": str(home / ".mpl"),
               "HYDRA_FULL_ERROR": "0", **(env or {})}
        request = {"module": module, "args": args, "cwd": str(case), "env": env, "timeout": timeout,
                   "address_space_mb": ADDRESS_SPACE_MB, "stdout": str(case / "stdout.txt"), "stderr": str(case / "stderr.txt")}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        text = {name: (case / f"{name}.txt").read_text(errors="replace") for name in ("stdout", "stderr")}
        self.exits[answer["exit"]] += 1
        return Outcome(**answer, **text)

    def close(self) -> None:
        print(f"fuzz cases by exit status: {dict(sorted(self.exits.items(), key=str))}")
        self.process.stdin.close()
        self.process.wait(timeout=30)


def assert_handled(outcome: Outcome, names: str | None = None) -> bool:
    """The case ended as a reader must end: exit 0 (returns True: the caller checks the result) or
    exit 2 with one `error:` line (naming `names`, the input, when given); never a traceback or a limit."""
    assert not outcome.timed_out and outcome.signal is None, outcome.describe()
    assert "Traceback (most recent call last)" not in outcome.stderr + outcome.stdout, outcome.describe()
    if outcome.exit == 0:
        return True
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    assert outcome.exit == 2 and len(errors) == 1, outcome.describe()
    if names is not None:
        assert names in errors[0], f"the error does not name {names}:\n{outcome.describe()}"
    return False


def data_summary(outcome: Outcome) -> dict:
    """What case_entries.read_data printed, checked: every split holds images, its class counts add up."""
    summary = json.loads(outcome.stdout.strip().splitlines()[-1])
    for split in ("train", "val", "test"):
        assert summary[split]["images"] >= 1 and sum(summary[split]["counts"]) == summary[split]["images"], summary
    return summary


def fuzz_settings(cases: int) -> settings:
    """A fixed seed in CI (`derandomize`); a long run passes --hypothesis-seed to explore elsewhere."""
    return settings(max_examples=cases, deadline=None, database=None, derandomize=True, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])


# --- nothing written outside the output folder ---


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file below `roots`, links not followed."""
    found = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                stat = os.lstat(path)
                found[path] = (stat.st_size, stat.st_mtime_ns)
    return found


def assert_writes_only_in(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], case: Path, *allowed: Path) -> None:
    """Nothing changed but under `allowed` and the case's own HOME and captured output."""
    allowed = (*allowed, case / "home", case / "stdout.txt", case / "stderr.txt")
    changed = {p for p in after.keys() | before.keys() if before.get(p) != after.get(p)}
    outside = sorted(p for p in changed if not any(p == str(a) or p.startswith(str(a) + os.sep) for a in allowed))
    assert not outside, f"the case wrote outside its output folder: {outside[:5]}"


# --- mutations ---


@dataclass(frozen=True)
class Field:
    """A header field: where it is, how wide, in which byte order."""

    offset: int
    width: int
    order: str = "big"


@dataclass(frozen=True)
class Layout:
    """What a format-aware mutation knows of a file: its header fields and its chunks (byte spans)."""

    fields: tuple[Field, ...] = ()
    chunks: tuple[tuple[int, int], ...] = ()
    text: bool = False


def mutations(data: bytes, layout: Layout) -> st.SearchStrategy[list[tuple]]:
    """A list of one to three mutations of `data`, each a tuple naming what it does."""
    size = max(1, len(data))
    ops: list[st.SearchStrategy[tuple]] = [
        st.tuples(st.just("flip"), st.integers(0, size - 1), st.integers(0, 7)),
        st.tuples(st.just("truncate"), st.integers(0, size - 1)),
        st.tuples(st.just("insert"), st.integers(0, size), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("empty")),
    ]
    if layout.fields:
        ops.append(st.tuples(st.just("field"), st.sampled_from(layout.fields), st.sampled_from(HEADER_VALUES)))
    if layout.chunks:
        ops.append(st.tuples(st.sampled_from(["repeat", "drop"]), st.sampled_from(layout.chunks)))
    if layout.text:
        ops += [st.tuples(st.just("bom")), st.tuples(st.just("endings"), st.sampled_from(["\r\n", "\r"]))]
    return st.lists(st.one_of(ops), min_size=1, max_size=3)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    """`data` with `ops` applied in order; positions past the end (after a truncation) clamp to it."""
    for op in ops:
        kind = op[0]
        if kind == "flip":
            if data:
                position = op[1] % len(data)
                data = data[:position] + bytes([data[position] ^ (1 << op[2])]) + data[position + 1 :]
        elif kind == "truncate":
            data = data[: op[1]]
        elif kind == "insert":
            position = min(op[1], len(data))
            data = data[:position] + op[2] + data[position:]
        elif kind == "empty":
            data = b""
        elif kind == "field":
            field, value = op[1], op[2]
            if field.offset + field.width <= len(data):
                raw = (value % 2 ** (8 * field.width)).to_bytes(field.width, field.order)
                data = data[: field.offset] + raw + data[field.offset + field.width :]
        elif kind == "repeat":
            start, end = op[1]
            data = data[:end] + data[start:end] + data[end:]
        elif kind == "drop":
            start, end = op[1]
            data = data[:start] + data[end:]
        elif kind == "bom":
            data = BOM + data
        elif kind == "endings":
            data = data.replace(b"\r\n", b"\n").replace(b"\n", op[1].encode())
    return data


def is_semantic_noop(ops: list[tuple]) -> bool:
    """Mutations a text reader must read as the original: a BOM and other line endings."""
    return all(op[0] in ("bom", "endings") for op in ops)


# --- format layouts ---


def png_layout(data: bytes) -> Layout:
    """IHDR's width, height, depth, colour type and interlace method, every chunk's length, and the chunks."""
    fields = [Field(16, 4), Field(20, 4), Field(24, 1), Field(25, 1), Field(28, 1)]
    chunks = []
    offset = 8
    while offset + 12 <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        fields.append(Field(offset, 4))
        chunks.append((offset, offset + 12 + length))
        offset += 12 + length
    return Layout(tuple(fields), tuple(chunks))


def fix_png_crcs(data: bytes) -> bytes:
    """Every whole chunk's CRC made right again, so that a mutation reaches the decoder instead of
    stopping at its checksum, as PNG fuzzers do."""
    out, offset = bytearray(data[:8]), 8
    while offset + 12 <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        end = offset + 12 + length
        if end > len(data):
            break
        body = data[offset + 4 : end - 4]
        out += data[offset : end - 4] + zlib.crc32(body).to_bytes(4, "big")
        offset = end
    return bytes(out + data[offset:])


def jpeg_layout(data: bytes) -> Layout:
    """Each marker segment's length, the frame header's precision, height, width and component
    count, and the segments (the scan's entropy-coded data as one chunk)."""
    fields, chunks = [], []
    offset = 2
    while offset + 4 <= len(data) and data[offset] == 0xFF:
        marker = data[offset + 1]
        length = int.from_bytes(data[offset + 2 : offset + 4], "big")
        fields.append(Field(offset + 2, 2))
        if marker in (0xC0, 0xC1, 0xC2):
            fields += [Field(offset + 4, 1), Field(offset + 5, 2), Field(offset + 7, 2), Field(offset + 9, 1)]
        chunks.append((offset, offset + 2 + length))
        if marker == 0xDA:  # start of scan: the entropy-coded data runs to the end marker
            chunks.append((offset + 2 + length, max(offset + 2 + length, len(data) - 2)))
            break
        offset += 2 + length
    return Layout(tuple(fields), tuple(chunks))


def dicom_layout(path: Path) -> Layout:
    """The image attributes' values (Rows, Columns, bit depths, samples, frames), every element's
    length field, and the elements, from pydicom's own element reader."""
    from pydicom.filereader import data_element_generator, read_preamble

    image_tags = {0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280102, 0x00280002, 0x00280008, 0x00280103}
    fields, chunks = [], []
    with path.open("rb") as f:
        read_preamble(f, False)
        start = f.tell()
        for element in data_element_generator(f, is_implicit_VR=False, is_little_endian=True):
            header = 12 if element.VR in ("OB", "OW", "OF", "SQ", "UT", "UN") else 8
            begin = element.value_tell - header
            chunks.append((begin, element.value_tell + (element.length if element.length != 0xFFFFFFFF else 0)))
            fields.append(Field(element.value_tell - 4 if header == 12 else element.value_tell - 2, 4 if header == 12 else 2, "little"))
            if element.tag in image_tags:
                fields.append(Field(element.value_tell, min(2, element.length or 2), "little"))
    del start
    return Layout(tuple(fields), tuple(chunks))


def zip_layout(data: bytes) -> Layout:
    """Every local header's CRC, sizes and name/extra lengths, every central directory entry's, the
    end record's counts and offsets (little-endian), and each entry's local record as a chunk."""
    fields, chunks = [], []
    starts = [i for i in range(len(data) - 4) if data[i : i + 4] == b"PK\x03\x04"]
    for i in starts:
        fields += [Field(i + off, width, "little") for off, width in ((14, 4), (18, 4), (22, 4), (26, 2), (28, 2))]
    for i in (i for i in range(len(data) - 4) if data[i : i + 4] == b"PK\x01\x02"):
        fields += [Field(i + off, width, "little") for off, width in ((16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (42, 4))]
    end = data.rfind(b"PK\x05\x06")
    if end >= 0:
        fields += [Field(end + off, width, "little") for off, width in ((8, 2), (10, 2), (12, 4), (16, 4))]
        central = data.find(b"PK\x01\x02")
        bounds = [*starts, central if central >= 0 else end]
        chunks = list(zip(bounds[:-1], bounds[1:]))
    return Layout(tuple(fields), tuple(chunks))


def text_layout(data: bytes) -> Layout:
    """A text file's lines as its chunks."""
    chunks, start = [], 0
    for line in data.splitlines(keepends=True):
        chunks.append((start, start + len(line)))
        start += len(line)
    return Layout((), tuple(chunks), text=True)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass
class Fixture:
    """A valid file a reader is fuzzed from, and what its layout lets a mutation aim at."""

    data: bytes
    layout: Layout
    after: Callable[[bytes], bytes] | None = None  # applied to some mutated files (a CRC fixed)


def written(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def case_folders(root: Path) -> Iterator[Path]:
    """case-0, case-1, ...: a fresh folder for every case (Hypothesis reruns cases while shrinking)."""
    number = 0
    while True:
        folder = root / f"case-{number}"
        number += 1
        if not folder.exists():
            folder.mkdir(parents=True)
            yield folder


def fuzz_cases(config: Any, ci: int) -> int:
    """--fuzz-cases when given, else the CI count of this reader."""
    value = config.getoption("--fuzz-cases")
    return int(value) if value else ci


# --- structure-aware mutations of loaded data (a checkpoint's dict, a metrics.json) ---

HOSTILE_VALUES = (0, -1, 2**31, -(2**31), 2**63 - 1, None, "x", "", [], {}, float("nan"), float("inf"), True,
                  [0] * 100_000, "y" * 1_000_000, {"_target_": "os.system"})


def leaf_paths(tree: Any, max_depth: int = 7, prefix: tuple = ()) -> list[tuple]:
    """The keys (and list indices) that lead to every value of a nested dict, and every container."""
    paths = [prefix] if prefix else []
    if len(prefix) >= max_depth:
        return paths
    if isinstance(tree, dict):
        for key, value in tree.items():
            paths += leaf_paths(value, max_depth, (*prefix, key))
    elif isinstance(tree, list) and len(tree) <= 64:
        for index, value in enumerate(tree):
            paths += leaf_paths(value, max_depth, (*prefix, index))
    return paths


def changed_at(tree: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    """A copy of `tree` whose value at `path` is `value` (or removed), containers copied on the way."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy = dict(tree) if isinstance(tree, dict) else list(tree)
    if not rest and delete:
        del copy[head]
    else:
        copy[head] = changed_at(copy[head], rest, value, delete)
    return copy
