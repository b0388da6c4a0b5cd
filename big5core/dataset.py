"""The BIG5-CHAT dataset format: loading, validation, artifact filtering, scenario splits.

Shared by the trainer (adapters are trained on it), the evaluator (the trait judge is trained on its
replies, the dialogue assessment draws held-out Speaker X turns from it) and the Prompt-Demo
baseline (demonstrations are drawn from its filtered rows).

Sources (:func:`load_rows`): a local ``.csv``/``.jsonl``/``.parquet`` file, a folder holding the
released ``big5_chat_dataset.csv``, ``"bundled:big5chat-real"`` (1,280 real rows of the released
dataset shipped in ``big5core/data``, see its README), or a Hugging Face dataset name such as
``"wenkai-li/big5_chat"`` (needs a network and the ``datasets`` package, imported only then).

The held-out scenarios (:func:`heldout_split`) are a property of the data, not of a run: a
scenario is held out when the hash of (seed, scenario id) falls below the fraction, so a training
job with ``test_fraction >= HELDOUT_FRACTION`` and the same seed never trains on one of them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar

from big5core.errors import Invalid
from big5core.traits import TRAITS, Level, Trait

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("original_index", "trait", "level", "train_input", "train_output")
"""Columns a source must have; the other columns of the released schema are optional."""

BUNDLED_REAL = "bundled:big5chat-real"
"""Source name of the bundled excerpt of the released dataset (10 arms x 128 real rows)."""

HELDOUT_FRACTION = 0.2
"""Share of scenarios held out from training by default (the dialogue assessment's Speaker X turns)."""

HELDOUT_SEED = 0

HUB_DATASET = "wenkai-li/big5_chat"
"""The released dataset on the Hugging Face hub."""

DATASET_FILENAME = "big5_chat_dataset.csv"
"""File name of the released CSV; a folder given as source must hold it."""

Record = dict[str, Any]

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NULL_TEXTS = frozenset({"", "nan", "null"})


class DatasetError(Invalid):
    """The dataset cannot be used as given; the message names the problem and where it is."""

    code, title = "invalid-dataset", "The dataset cannot be used"


@dataclass(frozen=True)
class Row:
    """One dialogue: Speaker X opens, Speaker Y answers at ``level`` of ``trait``; null texts load as ``""``."""

    scenario: str
    trait: Trait
    level: Level
    speaker_x: str
    speaker_y: str
    instruction: str | None


# ----------------------------------------------------------------------------- loading


def bundled_path() -> Path:
    """Path of the bundled real excerpt (128 scenarios x 10 arms, the released schema plus ``source``)."""
    return Path(str(files("big5core") / "data" / "big5chat_real.csv"))


def load_rows(source: str | Path) -> list[Row]:
    """Load and validate a BIG5-CHAT source (see the module docstring for what ``source`` may be).

    Raises :class:`DatasetError` for an empty file or source without rows, missing required
    columns, and unknown trait or level values (with their 1-based row numbers, header excluded).
    Nulls in the label columns (``original_index``, ``trait``, ``level``) are errors too, since
    such a row cannot be placed; nulls in the speaker texts are not: they are counted here (logged)
    and dropped by :func:`filter_artifacts`.
    """
    records, origin = _read_source(source)
    rows = _to_rows(records, origin)
    n_null = sum(1 for row in rows if _is_null_text(row.speaker_x) or _is_null_text(row.speaker_y))
    logger.info("loaded %d rows from %s (%d with a null speaker text)", len(rows), origin, n_null)
    return rows


def read_records(path: Path) -> list[Record]:
    """The records of a local ``.csv``/``.jsonl``/``.parquet`` file (or a folder holding the released CSV).

    Empty CSV cells are None. Raises :class:`DatasetError` for a folder without the released CSV, an
    unsupported file type, an empty file and a JSONL line that is not a JSON object.
    """
    return _read_file(Path(path))[0]


def _read_source(source: str | Path) -> tuple[list[Record], str]:
    if isinstance(source, str) and source == BUNDLED_REAL:
        return _read_file(bundled_path())
    path = Path(source)
    if path.exists():
        return _read_file(path)
    if isinstance(source, Path) or path.suffix.lower() in _READERS or not _HUB_NAME.match(source):
        raise DatasetError(f"no such file or folder: {source}")
    return _read_hub(source), f"hub dataset {source}"


def _read_file(path: Path) -> tuple[list[Record], str]:
    if path.is_dir():
        folder, path = path, path / DATASET_FILENAME
        if not path.is_file():
            raise DatasetError(f"folder {folder} has no {DATASET_FILENAME}")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        known = ", ".join(sorted(_READERS))
        raise DatasetError(f"unsupported file type {path.suffix or '(none)'!r} for {path}; expected {known}")
    if path.stat().st_size == 0:
        raise DatasetError(f"empty file: {path}")
    return reader(path), str(path)


def _read_csv(path: Path) -> list[Record]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise DatasetError(f"empty file: {path}")
        # An empty CSV cell is a null; stray extra fields (key None) are ignored.
        return [{k: (v if v != "" else None) for k, v in rec.items() if k is not None} for rec in reader]


def _read_jsonl(path: Path) -> list[Record]:
    records: list[Record] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}: line {line_no} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}: line {line_no} is not a JSON object")
            records.append(record)
    if not records:
        raise DatasetError(f"empty file: {path}")  # blank lines only
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq  # heavy, and only needed for this format

    records: list[Record] = pq.read_table(path).to_pylist()
    return records


_READERS: dict[str, Callable[[Path], list[Record]]] = {
    ".csv": _read_csv,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}


def _read_hub(name: str) -> list[Record]:
    try:
        from datasets import load_dataset  # heavy, and needs a network
    except ImportError as exc:  # pragma: no cover - datasets ships with the train extra
        raise DatasetError(f"loading hub dataset {name} needs the 'datasets' package (big5chat[train])") from exc
    records: list[Record] = load_dataset(name, split="train").to_list()
    return records


def _cell(value: Any) -> Any:
    """A cell with NaN (pandas/JSON nulls) mapped to None."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _text(value: Any) -> str:
    return "" if (value := _cell(value)) is None else str(value)


def _scenario_id(value: Any) -> str | None:
    value = _cell(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # an int column with nulls read as float
    return None if value is None else (str(value).strip() or None)


def _label(parse: Callable[[str], Trait | Level], value: Any) -> Any:
    try:
        return parse(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _where(bad: dict[str, list[int]], limit: int = 5) -> str:
    """``'x' at rows 3, 7; null at row 9`` (1-based row numbers, header excluded)."""
    items = []
    for value, row_nos in list(bad.items())[:limit]:
        shown = ", ".join(str(n) for n in row_nos[:limit]) + (" and more" if len(row_nos) > limit else "")
        items.append(f"{value} at row{'s' if len(row_nos) > 1 else ''} {shown}")
    return "; ".join(items) + (" and more" if len(bad) > limit else "")


def _to_rows(records: Sequence[Record], origin: str) -> list[Row]:
    """Check columns and label values of every record, then convert; raise one error naming every problem."""
    if not records:
        raise DatasetError(f"no rows in {origin}")
    columns: set[str] = set()
    for record in records:
        columns.update(record)
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise DatasetError(f"{origin}: missing required column(s): {', '.join(missing)}")
    bad: dict[str, dict[str, list[int]]] = {"original_index": {}, "trait": {}, "level": {}}
    rows: list[Row] = []
    for row_no, record in enumerate(records, start=1):
        scenario = _scenario_id(record.get("original_index"))
        trait = _label(Trait.parse, _cell(record.get("trait")))
        level = _label(lambda v: Level(v.strip().lower()), _cell(record.get("level")))
        for column, parsed in (("original_index", scenario), ("trait", trait), ("level", level)):
            if parsed is None:
                value = _cell(record.get(column))
                bad[column].setdefault("null" if value is None else repr(value), []).append(row_no)
        if scenario is not None and trait is not None and level is not None:
            instruction = _text(record.get("train_instruction")).strip() or None
            speaker_x, speaker_y = _text(record.get("train_input")), _text(record.get("train_output"))
            rows.append(Row(scenario, trait, level, speaker_x, speaker_y, instruction))
    problems = []
    if bad["original_index"]:
        problems.append(f"null original_index: {_where(bad['original_index'])}")
    if bad["trait"]:
        expected = ", ".join(t.value for t in TRAITS)
        problems.append(f"unknown trait value(s): {_where(bad['trait'])} (expected one of {expected})")
    if bad["level"]:
        problems.append(f"unknown level value(s): {_where(bad['level'])} (expected high or low)")
    if problems:
        raise DatasetError(f"{origin}: " + "; ".join(problems))
    return rows


# ----------------------------------------------------------------------------- filtering

_REFUSALS = re.compile(
    "|".join(
        [
            r"\bI (?:cannot|can ?not|can't|won't|will not) (?:create|generate|write|produce|provide) "
            r"(?:content|a (?:response|dialogue|conversation|story|reply))",
            r"\bI (?:cannot|can ?not|can't) (?:assist|fulfill|comply)\b",
            r"\bI (?:cannot|can ?not|can't|won't) (?:help|engage) with (?:that|this|your) request",
            r"\bI'm sorry,? but I (?:cannot|can ?not|can't) (?:create|generate|write|fulfill|assist|comply|"
            r"provide|engage|continue|help with (?:that|this) request)",
            r"\bas an AI\b",
            r"\bas an? (?:large )?language model\b",
            r"\bI'm (?:just )?an AI\b",
        ]
    ),
    re.IGNORECASE,
)
"""Model refusal boilerplate. Plain "I can't help" is left alone: a low-agreeableness speaker says it."""

_SPAN = r"(?:\*[^*\n]*[^\W\d_][^*\n]*\*|\([^()\n]*[^\W\d_][^()\n]*\))"
_STAGE_DIRECTION = re.compile(rf"(?:^\s*|[.!?\u2026][\"'\u201d]?\s+){_SPAN}")
"""``*sighs* Fine.`` or ``Okay. (laughs nervously)``: narration where a sentence would start, an
artifact of the generator the paper lists. Emphasis inside a sentence (``I'm *so* excited``) and
asides in parentheses (``my sister (the older one)``) are ordinary writing and stay."""

_PUNCTUATION = re.compile(r"[^\w\s]")


def near_duplicate_key(text: str) -> str:
    """The text as compared for near duplicates: NFKC, lower case, punctuation removed, spaces collapsed."""
    text = _PUNCTUATION.sub("", unicodedata.normalize("NFKC", text).lower())
    return " ".join(text.split())


def _is_null_text(text: str) -> bool:
    return text.strip().lower() in _NULL_TEXTS


def arm(trait: Trait, level: Level) -> str:
    """The name of one trait-level arm of the data, e.g. ``openness-high``."""
    return f"{trait.value}-{level.value}"


@dataclass
class FilterReport:
    """How many rows :func:`filter_artifacts` dropped, by the first reason that applied, in all and per arm."""

    total_in: int = 0
    null: int = 0
    refusal: int = 0
    stage_direction: int = 0
    cross_level_duplicate: int = 0
    exact_duplicate: int = 0
    near_duplicate: int = 0
    kept: int = 0
    by_arm: dict[str, Counter[str]] = field(default_factory=dict)
    """arm -> counts of ``total_in``, each reason and ``kept``."""

    REASONS: ClassVar[tuple[str, ...]] = (
        "null",
        "refusal",
        "stage_direction",
        "cross_level_duplicate",
        "exact_duplicate",
        "near_duplicate",
    )

    @property
    def dropped(self) -> int:
        return sum(getattr(self, reason) for reason in self.REASONS)

    def count(self, row: Row, what: str) -> None:
        if what != "total_in" and what != "kept":
            setattr(self, what, getattr(self, what) + 1)
        self.by_arm.setdefault(arm(row.trait, row.level), Counter())[what] += 1

    def as_dict(self) -> dict[str, Any]:
        """Totals and per-arm counts, for job logs and reports (JSON-ready)."""
        totals = {reason: getattr(self, reason) for reason in self.REASONS}
        return {
            "total_in": self.total_in,
            "kept": self.kept,
            "dropped": totals,
            "by_arm": {name: dict(counts) for name, counts in sorted(self.by_arm.items())},
        }

    def format(self) -> str:
        """A plain-text table: one row per arm, one column per reason, then the totals."""
        heads = ["in", "null", "refusal", "stage", "x-level", "exact", "near", "kept"]
        width = 9
        lines = [f"{'arm':<22}" + "".join(f"{h:>{width}}" for h in heads)]
        keys = ["total_in", *self.REASONS, "kept"]
        for name, counts in sorted(self.by_arm.items()):
            lines.append(f"{name:<22}" + "".join(f"{counts.get(k, 0):>{width}}" for k in keys))
        lines.append("-" * len(lines[0]))
        totals = [self.total_in, *(getattr(self, r) for r in self.REASONS), self.kept]
        lines.append(f"{'all arms':<22}" + "".join(f"{v:>{width}}" for v in totals))
        share = 100.0 * self.dropped / self.total_in if self.total_in else 0.0
        lines.append(f"dropped {self.dropped} of {self.total_in} rows ({share:.1f}%), kept {self.kept}")
        return "\n".join(lines)


def filter_artifacts(records: Iterable[Row]) -> tuple[list[Row], FilterReport]:
    """Drop the known artifacts of the released data; each dropped row is counted once, first reason wins.

    In order: a null or empty Speaker X or Speaker Y text; refusal boilerplate in the reply; a
    stage direction (see ``_STAGE_DIRECTION``) in the reply (dropped, never rewritten); a reply
    given at both levels of one trait (compared by :func:`near_duplicate_key`): every copy is
    dropped, on both sides, since it says nothing about the level and would make a DPO pair with
    chosen == rejected; then a reply identical (after trimming) to an earlier kept reply, and a
    near duplicate of one (same key), anywhere in the input: the first copy stays.
    """
    report = FilterReport()
    candidates: list[tuple[Row, str, str]] = []
    levels: dict[tuple[Trait, str], set[Level]] = {}
    for row in records:
        report.total_in += 1
        report.count(row, "total_in")
        reply = row.speaker_y.strip()
        if _is_null_text(row.speaker_x) or _is_null_text(reply):
            report.count(row, "null")
        elif _REFUSALS.search(reply.replace("\u2019", "'")):
            report.count(row, "refusal")
        elif _STAGE_DIRECTION.search(reply):
            report.count(row, "stage_direction")
        else:
            near = near_duplicate_key(reply)
            candidates.append((row, reply, near))
            levels.setdefault((row.trait, near), set()).add(row.level)
    kept: list[Row] = []
    seen_exact: set[str] = set()
    seen_near: set[str] = set()
    for row, reply, near in candidates:
        if len(levels[(row.trait, near)]) > 1:
            report.count(row, "cross_level_duplicate")
        elif reply in seen_exact:
            report.count(row, "exact_duplicate")
        elif near in seen_near:
            report.count(row, "near_duplicate")
        else:
            seen_exact.add(reply)
            seen_near.add(near)
            kept.append(row)
            report.count(row, "kept")
    report.kept = len(kept)
    return kept, report


def load_filtered(source: str | Path) -> tuple[list[Row], FilterReport]:
    """:func:`load_rows` then :func:`filter_artifacts`; raises :class:`DatasetError` when nothing is left."""
    kept, report = filter_artifacts(load_rows(source))
    if not kept:
        raise DatasetError(f"dataset {str(source)!r}: no rows left after filtering\n{report.format()}")
    return kept, report


# ----------------------------------------------------------------------------- selection and splits


def split_by_scenario(rows: Sequence[Row], test_fraction: float = 0.1, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """(train, test), with a scenario's rows always on one side.

    A scenario goes to test when the hash of (seed, scenario id) falls below ``test_fraction``, so
    its side depends on nothing else in the data (a filtered subset splits the same way); the test
    share of scenarios is therefore ``test_fraction`` in expectation, not exactly. Order is kept.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    side: dict[str, bool] = {}
    train: list[Row] = []
    test: list[Row] = []
    for row in rows:
        in_test = side.get(row.scenario)
        if in_test is None:
            digest = hashlib.sha256(f"{seed}\x00{row.scenario}".encode()).digest()
            in_test = side[row.scenario] = int.from_bytes(digest[:8], "big") / 2.0**64 < test_fraction
        (test if in_test else train).append(row)
    return train, test


def heldout_split(
    rows: Sequence[Row], fraction: float = HELDOUT_FRACTION, seed: int = HELDOUT_SEED
) -> tuple[list[Row], list[Row]]:
    """(train, held out): :func:`split_by_scenario` at the project's held-out fraction and seed."""
    return split_by_scenario(rows, fraction, seed)


def select(rows: Iterable[Row], trait: Trait | None = None, level: Level | None = None) -> list[Row]:
    """The rows of one trait and/or level (None matches all)."""
    return [r for r in rows if (trait is None or r.trait is trait) and (level is None or r.level is level)]


def dataset_hash(rows: Iterable[Row]) -> str:
    """sha256 (hex) of the rows in order: one compact JSON array per row, newline-separated."""
    digest = hashlib.sha256(b"big5chat-rows-v1\n")
    for r in rows:
        values = [r.scenario, r.trait.value, r.level.value, r.speaker_x, r.speaker_y, r.instruction]
        digest.update(json.dumps(values, ensure_ascii=False, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()
