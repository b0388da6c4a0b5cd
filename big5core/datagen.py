"""Data-generation (PsychSteer / DExperts) job specifications: stored as JSON in the job row.

A datagen job shares the training-job queue (``big5core.jobs``): its spec carries
``"kind": "datagen"``, which is how the worker tells it from a training spec, so the table needs no
new column. The service validates requests against :class:`DatagenSpec`; ``trainer.datagen`` runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from pydantic import ConfigDict, Field

from big5core.errors import Invalid
from big5core.training import ConditionsSpec

DATAGEN_KIND = "datagen"

TraitScorer = Callable[[Sequence[str]], Mapping[str, Sequence[float]]]
"""texts -> {trait: P(high | text) per text}: the trait judge, injected by a composition root."""


class DatagenError(Invalid):
    """A data-generation job cannot run as given (bad scenarios file, unknown expert, ...)."""

    code, title = "invalid-datagen-job", "The data-generation job cannot run as given"


class DatagenSpec(ConditionsSpec):
    """One generation run: scenarios in, BIG5-CHAT rows out, steered by an expert per condition."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["datagen"] = DATAGEN_KIND
    scenarios: str = Field(
        description="CSV/JSONL of scenarios in the released columns (original_index, relation, head, tail, "
        "literal, narrative, personx, persony, and optionally train_input = Speaker X's turn)"
    )
    output: str | None = Field(
        None, description="output .csv or .jsonl; default <data_dir>/datasets/datagen-<job id>.csv"
    )
    conditions: list[str] = Field(
        default_factory=lambda: ["extraversion:high", "extraversion:low"],
        description="trait:level conditions to generate (one row per scenario and condition)",
    )
    expert: str = Field(
        "sft-{trait}-{level}",
        description="per condition: an adapter name[@version] of the registry (placeholders {trait}, {level}, "
        "{opposite}), a model folder with the base's tokenizer, or 'prompt' (the base model itself, "
        "prompted with the trait-level)",
    )
    antiexpert: str | None = Field(
        None,
        description="optional anti-expert, as expert (e.g. 'sft-{trait}-{opposite}'): logits = base + "
        "alpha * (expert - antiexpert); without one, base + alpha * expert (the paper)",
    )
    alpha: float = Field(0.5, ge=0, le=20, description="expert strength (the paper: 0.5)")
    temperature: float = Field(0.0, ge=0, le=5, description="0 = greedy (the paper); the authors' code: 0.6")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (the authors' code: 0.9)")
    seed: int = Field(0, description="row i is sampled with seed + i")
    max_new_tokens: int = Field(256, ge=1, le=4096, description="reply token limit (the authors: 256)")
    turn0_max_new_tokens: int = Field(96, ge=1, le=4096, description="token limit of a generated Speaker X turn")
    batch_size: int = Field(4, ge=1, le=512, description="rows decoded together")
    limit: int | None = Field(None, ge=1, description="use only the first N scenarios")
    max_reply_chars: int = Field(1000, ge=1, description="length cap: longer replies are rejected")
    drop_unfinished: bool = Field(True, description="reject replies cut off at max_new_tokens")
    min_judge: float | None = Field(
        None, ge=0, le=1, description="reject rows whose judged P(target level) is below this (needs a judge)"
    )
