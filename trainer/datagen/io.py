"""Input scenarios and output rows of data generation, and the crash-safe part file.

Scenarios come as CSV or JSONL in the released BIG5-CHAT columns. Rows go out in the released
schema (``trait``, ``level``, ``train_instruction``, ``train_input``, ``train_output``, ...) plus
provenance columns, which the dataset loader ignores, so ``big5 train --dataset out.csv`` reads it.

While a run is under way every generated row (kept or rejected by a gate) is appended to
``<output>.part`` as one JSON line, flushed and fsynced per batch. The first line is a header with
the run's fingerprint. A killed run resumes after the last complete line; a torn last line is cut
off. On completion the kept rows are written to a temporary file, fsynced and renamed onto the
output (the rejected ones beside it), and only then is the part file removed.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from big5core.datagen import DatagenError
from big5core.dataset import DatasetError, read_records

SCENARIO_COLUMNS: tuple[str, ...] = (
    "original_index",
    "relation",
    "head",
    "tail",
    "literal",
    "narrative",
    "personx",
    "persony",
)
RELEASED_COLUMNS: tuple[str, ...] = (
    "original_index",
    "env_idx",
    "trait",
    "level",
    *SCENARIO_COLUMNS[1:],
    "train_instruction",
    "train_input",
    "train_output",
)
PROVENANCE_COLUMNS: tuple[str, ...] = (
    "base_model",
    "expert",
    "expert_sha256",
    "antiexpert",
    "antiexpert_sha256",
    "alpha",
    "temperature",
    "top_p",
    "seed",
    "template_id",
    "expert_template_id",
    "turn0_template_id",
    "reply_tokens",
    "finished",
    "judge_p_target",
    "gate",
)
OUTPUT_COLUMNS: tuple[str, ...] = RELEASED_COLUMNS + PROVENANCE_COLUMNS
SCENARIO_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl")
KEPT = "kept"


@dataclass(frozen=True)
class Scenario:
    original_index: str
    fields: dict[str, str]
    """The scenario columns present (empty strings for missing ones)."""
    speaker_x: str | None
    """Speaker X's turn when the file gives it (``train_input``)."""

    @property
    def x(self) -> str:
        return self.fields.get("personx") or "Speaker X"

    @property
    def y(self) -> str:
        return self.fields.get("persony") or "Speaker Y"

    @property
    def text(self) -> str:
        """The situation shown to the model: the narrative, else the literal, else the head with names."""
        f = self.fields
        if f.get("narrative"):
            return f["narrative"]
        if f.get("literal"):
            return f["literal"]
        return f.get("head", "").replace("PersonX", self.x).replace("PersonY", self.y)


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DatagenError(f"no such scenarios file: {path}")
    if (suffix := path.suffix.lower()) not in SCENARIO_SUFFIXES:
        expected = " or ".join(SCENARIO_SUFFIXES)
        raise DatagenError(f"unsupported scenarios file type {suffix or '(none)'!r} for {path}; expected {expected}")
    try:
        return read_records(path)
    except DatasetError as exc:
        raise DatagenError(str(exc)) from None


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else str(value).strip()


def read_scenarios(path: str | Path, limit: int | None = None) -> list[Scenario]:
    """Unique scenarios in file order (the first row of each ``original_index``; released CSVs repeat them).

    Raises :class:`DatagenError` for a missing/unsupported/empty file, a missing ``original_index``
    column or value, and a scenario with neither a situation (narrative, literal or head) nor a
    Speaker X turn to answer.
    """
    path = Path(path)
    records = _records(path)
    if not records:
        raise DatagenError(f"no scenarios in {path}")
    if not any("original_index" in r for r in records):
        raise DatagenError(f"{path}: missing required column original_index")
    seen: dict[str, Scenario] = {}
    problems: list[str] = []
    for row_no, record in enumerate(records, start=1):
        index = _text(record.get("original_index"))
        if index.endswith(".0") and index[:-2].isdigit():
            index = index[:-2]
        if not index:
            problems.append(f"row {row_no}: null original_index")
            continue
        if index in seen:
            continue
        fields = {c: _text(record.get(c)) for c in SCENARIO_COLUMNS[1:]}
        speaker_x = _text(record.get("train_input")) or None
        scenario = Scenario(index, fields, speaker_x)
        if speaker_x is None and not scenario.text:
            problems.append(f"row {row_no}: scenario {index} has no narrative, literal, head or train_input")
            continue
        seen[index] = scenario
        if limit is not None and len(seen) >= limit:
            break
    if problems:
        shown = "; ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DatagenError(f"{path}: {shown}")
    return list(seen.values())


# ----------------------------------------------------------------------------- the part file


class PartFile:
    """Append-only JSONL of generated rows with a fingerprint header; see the module docstring."""

    def __init__(self, output: Path, fingerprint: str) -> None:
        self.output = output
        self.path = output.with_name(output.name + ".part")
        self.fingerprint = fingerprint

    def resume(self) -> list[dict[str, Any]]:
        """The rows already written by an earlier attempt of the same run (a torn last line is cut off).

        A part file of another run (different fingerprint) or without a header is discarded.
        """
        if not self.path.is_file():
            return []
        rows: list[dict[str, Any]] = []
        good = 0
        with self.path.open("rb") as handle:
            header = handle.readline()
            try:
                ok = header.endswith(b"\n") and json.loads(header).get("fingerprint") == self.fingerprint
            except (json.JSONDecodeError, AttributeError):
                ok = False
            if not ok:
                rows = []
            else:
                good = len(header)
                for line in handle:
                    if not line.endswith(b"\n"):
                        break
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        break
                    good += len(line)
        if not ok:
            self.path.unlink()
            return []
        if good != self.path.stat().st_size:
            with self.path.open("r+b") as handle:
                handle.truncate(good)
                handle.flush()
                os.fsync(handle.fileno())
        return rows

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append rows (creating the file with its header first); durable when this returns."""
        fresh = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as handle:
            if fresh:
                handle.write(json.dumps({"fingerprint": self.fingerprint}).encode() + b"\n")
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())

    def finalize(self, kept: Iterable[dict[str, Any]], rejected: Iterable[dict[str, Any]]) -> tuple[Path, Path]:
        """Write the output (and ``<stem>.rejected<suffix>``) atomically; the part file stays until removed."""
        rejected_path = self.output.with_name(f"{self.output.stem}.rejected{self.output.suffix}")
        for path, rows in ((rejected_path, rejected), (self.output, kept)):
            write_rows(path, rows)
        return self.output, rejected_path

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as CSV or JSONL (by suffix) to a temporary file, fsync, then rename onto ``path``."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise DatagenError(f"unsupported output type {suffix or '(none)'!r} for {path}; expected .csv or .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        if suffix == ".csv":
            writer = csv.DictWriter(handle, fieldnames=list(OUTPUT_COLUMNS), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        else:
            for row in rows:
                handle.write(json.dumps({c: row.get(c) for c in OUTPUT_COLUMNS}, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
