"""Demonstrations for the Prompt-Demo baseline: ten replies of one trait-level from a BIG5-CHAT CSV."""

from __future__ import annotations

import csv
import functools
from importlib import resources
from pathlib import Path

from big5core.traits import Level, Trait

BUNDLED_SAMPLE = "bundled:sample"


def _path(source: str) -> Path:
    if source == BUNDLED_SAMPLE:
        return Path(str(resources.files("trainer").joinpath("data", "big5_chat_sample.csv")))
    return Path(source)


@functools.lru_cache(maxsize=4)
def _rows(source: str) -> tuple[tuple[str, str, str, str], ...]:
    with _path(source).open(newline="", encoding="utf-8") as fh:
        return tuple(
            (
                r.get("original_index", ""),
                (r.get("trait") or "").lower(),
                (r.get("level") or "").lower(),
                r.get("train_output") or "",
            )
            for r in csv.DictReader(fh)
        )


def demo_examples(trait: Trait, level: Level, source: str = BUNDLED_SAMPLE, k: int = 10) -> list[str]:
    """The first ``k`` non-empty replies of ``trait``/``level`` in scenario order (deterministic)."""
    rows = [r for r in _rows(source) if r[1] == trait.value and r[2] == level.value and r[3].strip()]
    rows.sort(key=lambda r: (int(r[0]) if r[0].isdigit() else 0, r[0]))
    return [r[3].strip() for r in rows[:k]]
