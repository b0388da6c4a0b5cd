"""The dialogue assessment: personality measured in what the persona says, not in what it ticks.

The persona answers held-out Speaker X turns of the BIG5-CHAT data (scenarios no adapter trained
on at the default split), one fresh conversation each, the persona applied by the same resolver
as ``/v1/generate``. Each reply is stored with its text and the trait judge's P(high | reply) for
every trait; a trait's score is the mean judge probability over the replies, with its SD and a
percentile bootstrap 95% CI over items. It runs as the inventory ``big5chat-dialogue`` of
``POST /v1/assess`` (same storage, list, compare and plot endpoints as the questionnaires).

A reply that fails to generate, or comes back empty, is stored as a failure with its reason and
has no judge scores; it is never replaced by a default.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from big5core.dataset import (
    BUNDLED_REAL,
    HELDOUT_FRACTION,
    HELDOUT_SEED,
    DatasetError,
    heldout_split,
    load_filtered,
    near_duplicate_key,
)
from big5core.errors import Invalid
from big5core.models import InventoryRecord
from big5core.persona import ResolvedPersona
from big5core.prompts import ChatMessage
from evaluator.administer import Engine, ProgressFn, Response, Scores
from evaluator.judge import TraitJudge

DIALOGUE_INVENTORY = "big5chat-dialogue"
DIALOGUE_SCORING = "judge"
BOOTSTRAP_RESAMPLES = 2000

Split = Literal["heldout", "all"]


class DialogueSetError(Invalid):
    code, title = "dialogue-set-unavailable", "The dialogue assessment's held-out turns cannot be read"


class DialogueItem(BaseModel):
    id: str
    scenario: str
    text: str = Field(description="Speaker X's turn")


class DialogueSet(BaseModel):
    """The Speaker X turns a dialogue assessment asks, and where they came from."""

    kind: Literal["dialogue"] = "dialogue"
    name: str = DIALOGUE_INVENTORY
    title: str = "BIG5-CHAT dialogue: held-out Speaker X turns, replies scored by the trait judge"
    source: str
    split: Split
    items: list[DialogueItem]
    items_hash: str


def load_dialogue_set(source: str = BUNDLED_REAL, split: Split = "heldout") -> DialogueSet:
    """Speaker X turns of ``source`` (held-out scenarios, or every row for a file that is all held out).

    One item per distinct turn (compared by its near-duplicate key), in scenario order; the
    ten arms of a scenario usually share one or two wordings of it.
    """
    try:
        rows, _ = load_filtered(source)
    except DatasetError as exc:
        raise DialogueSetError(f"dialogue source {source!r}: {exc}") from exc
    if split == "heldout":
        rows = heldout_split(rows)[1]
    items: list[DialogueItem] = []
    seen: set[str] = set()
    per_scenario: dict[str, int] = {}
    for row in rows:
        key = near_duplicate_key(row.speaker_x)
        if key in seen:
            continue
        seen.add(key)
        k = per_scenario[row.scenario] = per_scenario.get(row.scenario, -1) + 1
        items.append(DialogueItem(id=f"{row.scenario}#{k}", scenario=row.scenario, text=row.speaker_x.strip()))
    if not items:
        raise DialogueSetError(f"dialogue source {source!r} has no held-out Speaker X turns")
    digest = hashlib.sha256(json.dumps([i.model_dump() for i in items], ensure_ascii=False).encode()).hexdigest()
    return DialogueSet(source=source, split=split, items=items, items_hash=digest)


class HeldOutOverlap(Invalid):
    code, title = "heldout-overlap", "The persona's adapter was trained on the held-out scenarios"


def check_unseen(session: Session, persona: ResolvedPersona, dialogue: DialogueSet) -> None:
    """Refuse a persona whose adapter trained on this set's held-out scenarios (known from its hyper-parameters).

    An adapter trained on the same source holds the turns out when its scenario split is at least the
    held-out fraction with the same seed (a scenario's side is a hash of its id); on another source,
    or a set that is a whole held-out file, nothing is known to overlap.
    """
    from big5core import registry

    if dialogue.split != "heldout":
        return
    for part in persona.parts:
        ref = part.get("adapter")
        if not ref:
            continue
        adapter = registry.get(session, str(ref), ready=False)
        hp = adapter.hyperparams or {}
        if hp.get("dataset") != dialogue.source:
            continue
        fraction, seed = float(hp.get("test_fraction", 0.0)), int(hp.get("seed", 0))
        if fraction < HELDOUT_FRACTION or seed != HELDOUT_SEED:
            raise HeldOutOverlap(
                f"adapter {adapter.ref} was trained on {dialogue.source} with test_fraction {fraction} and seed "
                f"{seed}: it saw scenarios the dialogue assessment holds out (needs >= {HELDOUT_FRACTION}, seed "
                f"{HELDOUT_SEED})"
            )


def dialogue_record(session: Session, dialogue: DialogueSet) -> InventoryRecord:
    """The inventory row the assessments of ``dialogue`` point at; its definition follows the current set.

    Each assessment also records the set's hash in its options, so results from another set of
    turns are never taken for the same measurement.
    """
    record = session.scalar(select(InventoryRecord).where(InventoryRecord.name == dialogue.name))
    definition = dialogue.model_dump(mode="json")
    if record is None:
        record = InventoryRecord(
            name=dialogue.name,
            title=dialogue.title,
            citation="Li et al., BIG5-CHAT (ACL 2025): held-out dialogues of the released dataset",
            licence="Apache-2.0 (the dataset)",
            instruction="(none: the persona answers Speaker X's turn)",
            statement_template="{statement}",
            scale={"kind": "judge", "range": [0.0, 1.0]},
            definition=definition,
            builtin=True,
        )
        session.add(record)
        session.flush()
    elif record.definition.get("items_hash") != dialogue.items_hash:
        record.definition = definition
        session.flush()
    return record


async def administer_dialogue(
    engine: Engine,
    persona: ResolvedPersona,
    dialogue: DialogueSet,
    judge: TraitJudge,
    *,
    runs: int,
    max_items: int | None,
    temperature: float,
    max_tokens: int,
    seed: int,
    lora: Any = None,
    progress: ProgressFn | None = None,
) -> list[Response]:
    """Every item of every run (items of a run concurrently, so the engine batches them), judged."""
    from big5core.engine import SamplingOptions

    items = dialogue.items[:max_items] if max_items else dialogue.items
    responses: list[Response] = []

    async def one(run: int, position: int, item: DialogueItem) -> Response:
        messages = persona.apply([ChatMessage(role="user", content=item.text)])
        out = Response(run=run, position=position, item_id=item.id, variant=0)
        sampling = SamplingOptions(
            max_tokens=max_tokens, temperature=temperature, seed=seed * 1_000_003 + run * 10_007 + position
        )
        try:
            result = await engine.generate(messages, sampling, lora=lora)
        except Exception as exc:  # recorded per item; the engine being down fails the whole run below
            if type(exc).__name__ in ("EngineNotReady", "EngineDeadError"):
                raise
            out.parse_error = f"generation failed: {type(exc).__name__}: {exc}"
            return out
        out.raw_text = result.text
        if not result.text.strip():
            out.parse_error = "empty reply"
        return out

    for run in range(runs):
        batch = await asyncio.gather(*(one(run, pos, item) for pos, item in enumerate(items)))
        answered = [r for r in batch if r.parse_error is None and r.raw_text]
        scores = judge.score([r.raw_text or "" for r in answered])
        for i, r in enumerate(answered):
            r.judge_scores = {trait: values[i] for trait, values in scores.items()}
        responses.extend(batch)
        if progress is not None:
            reported = progress(
                {"runs_done": run + 1, "runs": runs, "items_done": len(responses), "items": runs * len(items)}
            )
            if inspect.isawaitable(reported):
                await reported
    return responses


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of the mean (a single value gives a zero-width interval)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def score_dialogue(responses: Sequence[Response], runs: int, judge: TraitJudge, dialogue: DialogueSet) -> Scores:
    """Per trait: mean judge P(high) over the answered replies, SD across replies, bootstrap CI."""
    answered = [r for r in responses if r.judge_scores]
    failures = [r for r in responses if not r.judge_scores]
    traits: dict[str, dict[str, Any]] = {}
    detail: dict[str, dict[str, Any]] = {}
    for trait in judge.traits:
        values = [r.judge_scores[trait.value] for r in answered if r.judge_scores]
        if not values:
            traits[trait.value] = {"mean": None, "sd": None, "n_runs": runs, "alpha": None, "z": None}
            detail[trait.value] = {"n": 0}
            continue
        mean = float(np.mean(values))
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        low, high = bootstrap_ci(values)
        traits[trait.value] = {"mean": mean, "sd": sd, "n_runs": runs, "alpha": None, "z": None}
        detail[trait.value] = {"mean": mean, "sd": sd, "ci95": [low, high], "n": len(values)}
    lengths = [len(r.raw_text or "") for r in answered]
    summary: dict[str, Any] = {
        "kind": "dialogue",
        "n_responses": len(responses),
        "n_failed": len(failures),
        "parse_failure_rate": len(failures) / len(responses) if responses else None,
        "failures": [
            {"run": r.run, "item_id": r.item_id, "text": r.raw_text, "error": r.parse_error} for r in failures
        ][:200],
        "dialogue": detail,
        "reply_chars_mean": float(np.mean(lengths)) if lengths else None,
        "judge": {
            "name": judge.card.name,
            "kind": judge.card.kind,
            "sha256": judge.card.sha256,
            "data_hash": judge.card.data_hash,
            "heldout_accuracy": {t: m.heldout_accuracy for t, m in judge.card.traits.items()},
            "real_gap": {t: m.heldout_gap for t, m in judge.card.traits.items()},
        },
        "dialogue_set": {"source": dialogue.source, "split": dialogue.split, "items_hash": dialogue.items_hash},
    }
    return Scores(traits=traits, facets={}, summary=summary)
