"""BIG5-CHAT rows as TRL examples: SFT conversations and DPO preference pairs, in both layouts.

Loading, validation, artifact filtering and scenario splits live in :mod:`big5core.dataset` (the
evaluator reads the same data); they are re-exported here for the trainer's callers.

Layouts: ``unified`` is the paper's one adapter for all ten trait-level conditions, the instruction
before Speaker X's words in the user turn; ``per-trait`` is one adapter per trait-level condition,
the adapter itself the persona, so the prompt is Speaker X's words alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from big5core.dataset import (
    BUNDLED_REAL,
    DATASET_FILENAME,
    HELDOUT_FRACTION,
    HUB_DATASET,
    REQUIRED_COLUMNS,
    DatasetError,
    FilterReport,
    Row,
    bundled_path,
    dataset_hash,
    filter_artifacts,
    heldout_split,
    load_filtered,
    load_rows,
    near_duplicate_key,
    select,
    split_by_scenario,
)
from big5core.prompts import ChatMessage, InstructionPlacement, training_messages, unified_instruction
from big5core.training import LAYOUTS, PER_TRAIT, UNIFIED, Layout
from big5core.traits import Level, Trait

__all__ = [
    "BUNDLED_REAL",
    "DATASET_FILENAME",
    "HELDOUT_FRACTION",
    "HUB_DATASET",
    "REQUIRED_COLUMNS",
    "DatasetError",
    "FilterReport",
    "PairReport",
    "Row",
    "bundled_path",
    "dataset_hash",
    "dpo_pairs",
    "filter_artifacts",
    "heldout_split",
    "load_filtered",
    "load_rows",
    "near_duplicate_key",
    "select",
    "sft_examples",
    "split_by_scenario",
]

T = TypeVar("T")
logger = logging.getLogger(__name__)

Example = dict[str, list[ChatMessage]]
"""A TRL conversational example: ``{"messages": ...}`` (SFT) or ``{"prompt", "chosen", "rejected"}`` (DPO)."""


def _instruction(row: Row, layout: Layout) -> str | None:  # the per-trait layout has none
    return unified_instruction(row.trait, row.level) if layout == UNIFIED else None


def _check_layout(rows: Sequence[Row], layout: Layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout == PER_TRAIT:
        conditions = sorted({f"{r.trait.value}-{r.level.value}" for r in rows})
        if len(conditions) > 1:
            raise ValueError(
                "a per-trait adapter has no instruction, so its rows must share one trait-level condition; "
                f"got {', '.join(conditions)} (select one trait and level first)"
            )


def sft_examples(rows: Sequence[Row], layout: Layout, placement: InstructionPlacement = "user") -> list[Example]:
    """TRL conversational SFT examples ``{"messages": [user, assistant]}``.

    unified: the user turn is the paper's instruction, a blank line, then Speaker X's words (the
    instruction is rebuilt from the row's trait and level, not copied from the CSV). per-trait: the
    user turn is Speaker X's words alone, and all rows must share one trait-level condition.
    """
    _check_layout(rows, layout)
    return [{"messages": training_messages(_instruction(r, layout), r.speaker_x, r.speaker_y, placement)} for r in rows]


@dataclass
class PairReport:
    """Targets of :func:`dpo_pairs` that made no pair, by reason."""

    unpaired: int = 0
    """no row with the same scenario and trait at the opposite level"""
    mismatched_speaker_x: int = 0
    """a partner exists but answers a different Speaker X turn (compared by :func:`near_duplicate_key`)"""

    @property
    def skipped(self) -> int:
        return self.unpaired + self.mismatched_speaker_x

    def __iadd__(self, other: PairReport) -> PairReport:
        self.unpaired += other.unpaired
        self.mismatched_speaker_x += other.mismatched_speaker_x
        return self


def dpo_pairs(
    rows: Sequence[Row],
    layout: Layout,
    *,
    trait: Trait | None = None,
    level: Level | None = None,
    placement: InstructionPlacement = "user",
    mirror_key: bool = False,
) -> tuple[list[Example], PairReport]:
    """TRL conversational preference pairs ``{"prompt", "chosen", "rejected"}`` and what was skipped.

    Every row matching ``trait``/``level`` (all rows by default) is a target: chosen is its reply,
    rejected the reply of the first row with the same scenario and trait at the opposite level,
    looked up among all ``rows``. A target without such a partner, or whose partner answers another
    Speaker X turn (the rejected reply would then not answer the prompt), is skipped and counted,
    never paired. The prompt is built as in :func:`sft_examples` (unified: the instruction of the
    chosen level). For a per-trait adapter pass all rows of the trait and select the target
    condition with ``trait``/``level``, so the partners can be found. ``mirror_key`` adds each pair's
    scenario and trait under ``"mirror"``, for :func:`mirror_blocks`.
    """
    targets = select(rows, trait, level)
    _check_layout(targets, layout)
    partners: dict[tuple[str, Trait, Level], Row] = {}
    for row in rows:
        partners.setdefault((row.scenario, row.trait, row.level), row)
    pairs: list[Example] = []
    report = PairReport()
    for row in targets:
        partner = partners.get((row.scenario, row.trait, row.level.opposite))
        if partner is None:
            report.unpaired += 1
            continue
        if near_duplicate_key(partner.speaker_x) != near_duplicate_key(row.speaker_x):
            report.mismatched_speaker_x += 1
            continue
        pair: Example = {
            "prompt": training_messages(_instruction(row, layout), row.speaker_x, None, placement),
            "chosen": [ChatMessage(role="assistant", content=row.speaker_y.strip())],
            "rejected": [ChatMessage(role="assistant", content=partner.speaker_y.strip())],
        }
        if mirror_key:
            pair["mirror"] = mirror_of(row)
        pairs.append(pair)
    if report.skipped:
        logger.info(
            "dpo_pairs: %d of %d target rows skipped (%d without an opposite-level partner, %d whose partner "
            "answers another Speaker X turn)",
            report.skipped,
            len(targets),
            report.unpaired,
            report.mismatched_speaker_x,
        )
    return pairs, report


def mirror_of(row: Row) -> str:
    """What a row shares with its opposite-level twin: the scenario and the trait."""
    return f"{row.scenario}\x1f{row.trait.value}"


def mirror_blocks(items: Sequence[T], key: Callable[[T], str], seed: int) -> list[T]:
    """``items`` in blocks of mirror twins (same :func:`mirror_of` key: one scenario and trait, its
    levels), the blocks in a seeded random order, each block's items together in the order they came.

    A unified adapter is trained on these in this order (the trainer's sampler is sequential): each
    batch then holds a condition and its opposite for the same Speaker X turn. For DPO the push
    towards either level's style cancels inside the batch and what is left is the part that depends
    on the level word; with random batches, one that holds only "high" pairs pushes every reply
    towards the high style and the next one back, and this noise swamps the conditional signal. For
    SFT the twins share the batch too, but the pooled style is still rewarded: measured, plain SFT
    stays level-blind either way, and the level-contrast term (``TrainSpec.level_contrast``) is what
    makes it condition (``bench/unified_conditioning.py``, docs/RESULTS.md). A key seen once is a block
    of one.
    """
    import random

    blocks: dict[str, list[T]] = {}
    for item in items:
        blocks.setdefault(key(item), []).append(item)
    order = sorted(blocks)
    random.Random(seed).shuffle(order)
    return [item for k in order for item in blocks[k]]
