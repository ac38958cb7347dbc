"""Loaders for the CS224N default-project data files (SST, CFIMDB, Quora, STS).

Every file is tab-separated, UTF-8, one record per line, with csv double-quote escaping and a
header row whose first column is an unnamed row index. Columns are looked up by header name,
never by position (the ``*-test-student.csv`` files of SST and CFIMDB carry an extra leading
column).

A record never spans lines: each physical line is parsed on its own, so an unbalanced ``"``
spoils only its own line instead of swallowing the rows after it into one field. Malformed rows
(an unbalanced quote, a tab or line break inside a field, the wrong number of fields, an empty id
or sentence, a missing / non-numeric / out-of-range label) are skipped, reported with a
:class:`MalformedRowWarning` that counts every reason, and listed on the returned
:class:`LoadedSplit` as ``(line_number, reason)`` (1-based physical lines; the header is line 1).
"""
from __future__ import annotations

import csv
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from kernels._cli import UserError

TASKS = ("sst", "quora", "sts", "cfimdb")
SPLITS = ("train", "dev", "test")
MULTITASK_TASKS = ("sst", "quora", "sts")  # the tasks load_all returns

# File name per task and split; "test" is the unlabeled student test file.
DATA_FILES: dict[str, dict[str, str]] = {
    "sst": {"train": "ids-sst-train.csv", "dev": "ids-sst-dev.csv", "test": "ids-sst-test-student.csv"},
    "cfimdb": {"train": "ids-cfimdb-train.csv", "dev": "ids-cfimdb-dev.csv",
               "test": "ids-cfimdb-test-student.csv"},
    "quora": {"train": "quora-train.csv", "dev": "quora-dev.csv", "test": "quora-test-student.csv"},
    "sts": {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test-student.csv"},
}

_MAX_REPORTED_LINES = 10


class MalformedRowWarning(UserWarning):
    """Warned once per file that had rows skipped."""


class DataError(UserError, ValueError):
    """A data file cannot be read at all (not UTF-8, no header, missing columns); names the file."""


class _Skip(ValueError):
    """Why one row is skipped: ``kind`` (counted in the report) and the reason text."""

    def __init__(self, kind: str, reason: str | None = None):
        super().__init__(reason or kind)
        self.kind = kind


@dataclass(frozen=True)
class SentenceExample:
    """One sentence with its class (None in the unlabeled test split)."""

    id: str
    sentence: str
    label: int | None


@dataclass(frozen=True)
class PairExample:
    """A sentence pair with its label: int 0/1 for Quora, float 0.0-5.0 for STS, None for test."""

    id: str
    sentence1: str
    sentence2: str
    label: float | int | None


Example = Union[SentenceExample, PairExample]


@dataclass
class LoadedSplit:
    """The examples of one file, and the rows skipped as malformed.

    Attributes:
        task: "sst", "quora", "sts" or "cfimdb".
        split: "train", "dev" or "test".
        path: the file read.
        examples: the well-formed rows, in file order.
        skipped: ``(line_number, reason)`` per malformed row, line numbers 1-based (header = 1).
        skipped_ids: the ids of the malformed rows that had one (a prediction file that must
            cover every id of a test file needs them).
        skipped_kinds: the kind of each skipped row (``skip_counts`` counts them), in order.
    """

    task: str
    split: str
    path: Path
    examples: list[Example] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    skipped_ids: list[str] = field(default_factory=list)
    skipped_kinds: list[str] = field(default_factory=list)

    @property
    def labeled(self) -> bool:
        return self.split != "test"

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def __repr__(self) -> str:
        return (f"LoadedSplit(task={self.task!r}, split={self.split!r}, path={str(self.path)!r}, "
                f"examples={len(self.examples)}, skipped={len(self.skipped)})")

    def skip_counts(self) -> dict[str, int]:
        """Skipped rows per kind of reason, most frequent first."""
        return dict(Counter(self.skipped_kinds).most_common())

    def skip_report(self) -> str:
        """One line: every kind of reason with its count and (up to 10) line numbers."""
        parts = []
        for kind, n in self.skip_counts().items():
            lines = [line for (line, _), k in zip(self.skipped, self.skipped_kinds) if k == kind]
            shown = ", ".join(map(str, lines[:_MAX_REPORTED_LINES])) + (", ..." if n > _MAX_REPORTED_LINES else "")
            parts.append(f"{n} {kind} (line{'s' if n > 1 else ''} {shown})")
        return (f"{self.path}: skipped {len(self.skipped)} malformed row(s) at line(s) "
                f"{', '.join(str(line) for line, _ in self.skipped[:_MAX_REPORTED_LINES])}"
                f"{', ...' if len(self.skipped) > _MAX_REPORTED_LINES else ''}: {'; '.join(parts)} "
                f"(first: {self.skipped[0][1]})")


# ---------------------------------------------------------------------- label parsers
# Each returns the parsed label, or raises _Skip with the reason the row is skipped.
def _parse_number(text: str) -> float:
    if not text:
        raise _Skip("missing label", "label is missing")
    try:
        value = float(text)
    except ValueError:
        raise _Skip("label not a number", f"label {text!r} is not a number") from None
    if not math.isfinite(value):
        raise _Skip("label not a number", f"label {text!r} is not a finite number")
    return value


def _int_label(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _parse_number(text)
        if value != int(value):
            raise _Skip("label not an integer", f"label {text!r} is not an integer")
        if not low <= value <= high:
            raise _Skip("label out of range", f"label {text!r} is outside {low}..{high}")
        return int(value)
    return parse


def _float_label(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = _parse_number(text)
        if not low <= value <= high:
            raise _Skip("label out of range", f"label {text!r} is outside {low}..{high}")
        return value
    return parse


@dataclass(frozen=True)
class _TaskSpec:
    text_columns: tuple[str, ...]  # one column: SentenceExample; two: PairExample
    label_column: str
    parse_label: Callable[[str], float | int]


_SPECS: dict[str, _TaskSpec] = {
    "sst": _TaskSpec(("sentence",), "sentiment", _int_label(0, 4)),
    "cfimdb": _TaskSpec(("sentence",), "sentiment", _int_label(0, 1)),
    "quora": _TaskSpec(("sentence1", "sentence2"), "is_duplicate", _int_label(0, 1)),
    "sts": _TaskSpec(("sentence1", "sentence2"), "similarity", _float_label(0.0, 5.0)),
}


# ---------------------------------------------------------------------- loading
def _check_task_split(task: str, split: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def load_file(path: str | os.PathLike, task: str, split: str, *, warn: bool = True,
              _stacklevel: int = 2) -> LoadedSplit:
    """Read one data file of ``task`` in the format of ``split``.

    Args:
        path: the tab-separated file.
        task: "sst", "quora", "sts" or "cfimdb" (decides the columns and the label range).
        split: "train", "dev" or "test"; "test" files have no label column and give labels None.
        warn: issue a :class:`MalformedRowWarning` when rows were skipped.

    Returns:
        LoadedSplit with the examples and the skipped ``(line_number, reason)`` pairs.

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: a required column is missing from the header, or the file is not UTF-8.
    """
    _check_task_split(task, split)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{task} {split} data file {str(path)!r} does not exist")
    spec = _SPECS[task]
    labeled = split != "test"
    result = LoadedSplit(task=task, split=split, path=path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte {e.start}: {e.reason}); convert it to "
                        "UTF-8") from None
    lines = text.split("\n")  # only "\n" ends a record; "\r\n" endings are trimmed below
    if not lines[0].strip():
        raise DataError(f"{path} is empty: expected a header row")
    try:
        header = [name.strip() for name in _split_line(lines[0].rstrip("\r"), strict=False)]
    except _Skip as e:
        raise DataError(f"{path}: the header row is unreadable ({e})") from None
    columns = _column_indices(path, header, ("id", *spec.text_columns)
                              + ((spec.label_column,) if labeled else ()))
    for number, line in enumerate(lines[1:], start=2):
        line = line[:-1] if line.endswith("\r") else line
        if not line:  # blank line: not a record
            continue
        try:
            row = _split_line(line)
            result.examples.append(_parse_row(row, len(header), columns, spec, labeled))
        except _Skip as e:
            result.skipped.append((number, str(e)))
            result.skipped_kinds.append(e.kind)
            try:
                row = _split_line(line, strict=False)
            except _Skip:
                continue
            if len(row) > columns["id"] and row[columns["id"]].strip():
                result.skipped_ids.append(row[columns["id"]].strip())

    if result.skipped and warn:
        warnings.warn(result.skip_report(), MalformedRowWarning, stacklevel=_stacklevel)
    return result


def _split_line(line: str, strict: bool = True) -> list[str]:
    """The fields of one physical line (csv quoting, tab-separated). ``strict``: a quoted field
    still open at the end of the line is an error (``_Skip("unbalanced quote")``); other quoting
    oddities (text right after a closing quote) are read leniently, as csv does."""
    try:
        return next(csv.reader([line], delimiter="\t", quotechar='"', doublequote=True, strict=True))
    except csv.Error as e:
        if strict and "unexpected end of data" in str(e):
            raise _Skip("unbalanced quote", "unbalanced quote: a quoted field opens on this line and "
                        "does not close (the lines after it are read as their own rows)") from None
    try:
        return next(csv.reader([line], delimiter="\t", quotechar='"', doublequote=True, strict=False))
    except csv.Error as e:  # e.g. a NUL byte
        raise _Skip("unparseable row", f"unparseable row: {e}") from None


def _column_indices(path: Path, header: list[str], required: tuple[str, ...]) -> dict[str, int]:
    missing = [name for name in required if name not in header]
    if missing:
        raise DataError(f"{path}: missing required column(s) {', '.join(map(repr, missing))}; "
                         f"columns found: {', '.join(map(repr, header))}")
    repeated = [name for name in required if header.count(name) > 1]
    if repeated:
        raise DataError(f"{path}: column(s) {', '.join(map(repr, repeated))} appear more than once "
                         f"in the header {header!r}")
    return {name: header.index(name) for name in required}


def _parse_row(row: list[str], n_fields: int, columns: dict[str, int], spec: _TaskSpec,
               labeled: bool) -> Example:
    for i, value in enumerate(row):
        if "\t" in value or "\r" in value:
            raise _Skip("tab or line break inside a field",
                        f"field {i + 1} holds a {'tab' if chr(9) in value else 'line break'}")
    if len(row) != n_fields:
        raise _Skip("wrong number of fields", f"{len(row)} fields, expected {n_fields}")
    example_id = row[columns["id"]].strip()
    if not example_id:
        raise _Skip("empty id")
    texts = []
    for name in spec.text_columns:
        text = row[columns[name]].strip()
        if not text:
            raise _Skip("empty sentence", f"empty {name}")
        texts.append(text)
    label = spec.parse_label(row[columns[spec.label_column]].strip()) if labeled else None
    if len(texts) == 1:
        return SentenceExample(id=example_id, sentence=texts[0], label=label)
    return PairExample(id=example_id, sentence1=texts[0], sentence2=texts[1], label=label)


def load_task(task: str, split: str, data_dir: str | os.PathLike = "data/", *, warn: bool = True,
              _stacklevel: int = 3) -> LoadedSplit:
    """Load ``split`` of ``task`` from ``data_dir``.

    Args:
        task: "sst", "quora", "sts" or "cfimdb".
        split: "train", "dev" or "test" (the ``*-test-student.csv`` file, labels None).
        data_dir: directory holding the files named in :data:`DATA_FILES`.
        warn: issue a :class:`MalformedRowWarning` when rows were skipped.

    Raises:
        ValueError: unknown task or split; a required column is missing.
        FileNotFoundError: the data directory or the file does not exist.
    """
    _check_task_split(task, split)
    data_dir = Path(data_dir)
    check_data_dir(data_dir)
    return load_file(data_dir / DATA_FILES[task][split], task, split, warn=warn, _stacklevel=_stacklevel)


def check_data_dir(data_dir: str | os.PathLike, needs: list[tuple[str, str]] = ()) -> None:
    """``data_dir`` exists and holds the files of the ``(task, split)`` pairs in ``needs``;
    else a FileNotFoundError naming what is missing (cheap: run before any work starts)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        expected = ", ".join(name for files in DATA_FILES.values() for name in files.values())
        raise FileNotFoundError(f"data directory {str(data_dir)!r} does not exist; it should hold the "
                                f"CS224N files: {expected}")
    missing = sorted({DATA_FILES[t][s] for t, s in needs if not (data_dir / DATA_FILES[t][s]).is_file()})
    if missing:
        raise FileNotFoundError(f"data directory {str(data_dir)!r} lacks {', '.join(missing)} (the "
                                "CS224N files the run reads)")


def load_all(split: str, data_dir: str | os.PathLike = "data/", *,
             warn: bool = True) -> dict[str, LoadedSplit]:
    """Load ``split`` of the multitask tasks (sst, quora, sts).

    Args:
        split: "train", "dev" or "test".
        data_dir: directory holding the data files.
        warn: as in :func:`load_task`.

    Returns:
        ``{"sst": ..., "quora": ..., "sts": ...}``.
    """
    loaded = {}
    for task in MULTITASK_TASKS:  # a loop, not a comprehension: keeps the warning's stacklevel right
        loaded[task] = load_task(task, split, data_dir, warn=warn, _stacklevel=4)
    return loaded
