"""Assessments and inventories in the database. Functions take a session and never commit.

An assessment records the key that created it (``owner_key``, a key id, never the key); reads given
``owner_key`` see only that key's assessments, and another's is answered as unknown (not "forbidden",
which would tell that it exists). ``owner_key=None`` reads every assessment (admins, auth off).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, selectinload

from big5core.errors import Conflict, NotFound
from big5core.models import (
    Assessment,
    AssessmentState,
    InventoryItemRecord,
    InventoryRecord,
    ItemResponse,
    TraitScore,
    utcnow,
)
from evaluator.administer import Response, Scores
from evaluator.inventories import Inventory, InventoryError, builtin_inventories


class AssessmentNotFound(NotFound):
    code, title = "assessment-not-found", "Unknown assessment"


class AssessmentNotRunning(Conflict, RuntimeError):
    """An assessment was to be completed but is no longer running (e.g. a sweep marked it failed)."""

    code, title = "assessment-not-running", "The assessment is no longer running"


class InventoryNotFound(NotFound):
    code, title = "inventory-not-found", "Unknown inventory"


class InventoryConflict(Conflict, ValueError):
    code, title = "inventory-conflict", "Inventory already exists"


def _record(inventory: Inventory, builtin: bool) -> InventoryRecord:
    record = InventoryRecord(
        name=inventory.name,
        title=inventory.title,
        citation=inventory.citation,
        licence=inventory.licence,
        instruction=inventory.instruction,
        statement_template=inventory.statement_template,
        scale=inventory.scale.model_dump(mode="json"),
        definition=inventory.model_dump(mode="json"),
        builtin=builtin,
    )
    record.items = [
        InventoryItemRecord(
            item_id=item.id, position=i, text=item.text, trait=item.trait.value, facet=item.facet, keyed=item.keyed
        )
        for i, item in enumerate(inventory.items)
    ]
    return record


def _stored(session: Session, name: str) -> InventoryRecord | None:
    return session.scalar(select(InventoryRecord).where(InventoryRecord.name == name))


def _builtin(name: str) -> Inventory:
    builtin = builtin_inventories().get(name)
    if builtin is None:
        raise InventoryNotFound(f"unknown inventory {name!r}")
    return builtin


def inventory_record(session: Session, name: str) -> InventoryRecord:
    """The stored inventory ``name``; built-ins are stored on first use."""
    record = _stored(session, name)
    if record is not None:
        return record
    record = _record(_builtin(name), builtin=True)
    session.add(record)
    session.flush()
    return record


def load_inventory(session: Session, name: str) -> Inventory:
    """The inventory ``name``, read only: a built-in not stored yet comes from the package, so a read
    (``GET /v1/inventories/{name}``, a compare) never races an assessment's first insert of it."""
    record = _stored(session, name)
    return Inventory.model_validate(record.definition) if record is not None else _builtin(name)


def add_inventory(session: Session, inventory: Inventory) -> InventoryRecord:
    if inventory.name in builtin_inventories():
        raise InventoryConflict(f"{inventory.name!r} is a built-in inventory")
    if session.scalar(select(InventoryRecord.id).where(InventoryRecord.name == inventory.name)) is not None:
        raise InventoryConflict(f"inventory {inventory.name!r} exists already")
    record = _record(inventory, builtin=False)
    session.add(record)
    session.flush()
    return record


def list_inventories(session: Session) -> list[tuple[Inventory, bool]]:
    stored = {r.name: r for r in session.scalars(select(InventoryRecord))}
    out: list[tuple[Inventory, bool]] = [(inv, True) for inv in builtin_inventories().values()]
    out += [(Inventory.model_validate(r.definition), False) for r in stored.values() if not r.builtin]
    return out


def create(
    session: Session,
    *,
    persona: dict[str, Any],
    resolved: dict[str, Any],
    persona_key: str,
    method: str,
    inventory: InventoryRecord,
    scoring: str,
    runs: int,
    options: dict[str, Any],
    owner_key: str | None = None,
) -> Assessment:
    assessment = Assessment(
        owner_key=owner_key,
        persona=persona,
        resolved_persona=resolved,
        persona_key=persona_key,
        method=method,
        inventory_id=inventory.id,
        scoring_mode=scoring,
        runs=runs,
        options=options,
        state=AssessmentState.QUEUED,
    )
    session.add(assessment)
    session.flush()
    return assessment


def get(session: Session, assessment_id: str, *, with_scores: bool = True, owner_key: str | None = None) -> Assessment:
    query = select(Assessment).where(Assessment.id == assessment_id).options(selectinload(Assessment.inventory))
    if owner_key is not None:
        query = query.where(Assessment.owner_key == owner_key)
    if with_scores:
        query = query.options(selectinload(Assessment.scores))
    assessment = session.scalar(query)
    if assessment is None:
        raise AssessmentNotFound(f"unknown assessment {assessment_id}")
    return assessment


def responses(session: Session, assessment_id: str, *, owner_key: str | None = None) -> Sequence[ItemResponse]:
    get(session, assessment_id, with_scores=False, owner_key=owner_key)
    return session.scalars(
        select(ItemResponse)
        .where(ItemResponse.assessment_id == assessment_id)
        .order_by(ItemResponse.run, ItemResponse.position)
    ).all()


def search(
    session: Session,
    *,
    persona_key: str | None = None,
    method: str | None = None,
    inventory: str | None = None,
    state: str | None = None,
    limit: int = 100,
    offset: int = 0,
    owner_key: str | None = None,
) -> Sequence[Assessment]:
    query = (
        select(Assessment)
        .options(selectinload(Assessment.inventory), selectinload(Assessment.scores))
        .order_by(Assessment.created_at.desc())
    )
    if owner_key is not None:
        query = query.where(Assessment.owner_key == owner_key)
    if persona_key:
        query = query.where(Assessment.persona_key == persona_key)
    if method:
        query = query.where(Assessment.method == method)
    if state:
        query = query.where(Assessment.state == state)
    if inventory:
        query = query.join(InventoryRecord).where(InventoryRecord.name == inventory)
    return session.scalars(query.limit(limit).offset(offset)).all()


def mark_running(session: Session, assessment_id: str, lease: dict[str, Any]) -> None:
    """Start the assessment under the runner's ``lease`` (``big5core.lease.taken``)."""
    session.execute(
        update(Assessment)
        .where(Assessment.id == assessment_id)
        .values(state=AssessmentState.RUNNING, started_at=utcnow(), error=None, **lease)
    )


def complete(session: Session, assessment_id: str, items: list[Response], scores: Scores, expected_items: int) -> None:
    """Store every response and score and mark the assessment done: call inside ONE transaction.

    Refuses (InventoryError) when responses are missing, so an assessment is never done with holes.
    """
    if len(items) != expected_items:
        raise InventoryError(f"assessment {assessment_id}: {len(items)} responses, expected {expected_items}")
    claimed = session.execute(  # first, and only from running: a sweep's verdict (failed) is final
        update(Assessment)
        .where(Assessment.id == assessment_id, Assessment.state == AssessmentState.RUNNING)
        .values(state=AssessmentState.DONE, summary=scores.summary, finished_at=utcnow())
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        raise AssessmentNotRunning(f"assessment {assessment_id} is no longer running; its answers were not stored")
    session.execute(delete(ItemResponse).where(ItemResponse.assessment_id == assessment_id))
    session.execute(delete(TraitScore).where(TraitScore.assessment_id == assessment_id))
    session.add_all(
        ItemResponse(
            assessment_id=assessment_id,
            run=r.run,
            position=r.position,
            item_id=r.item_id,
            variant=r.variant,
            option_variant=r.option_variant,
            raw_text=r.raw_text,
            option_probs=r.option_probs,
            option_logprobs=r.option_logprobs,
            option_probs_norm=r.option_probs_norm,
            option_mass=r.option_mass,
            expected=r.expected,
            argmax=r.argmax,
            value=r.value,
            parse_error=r.parse_error,
            judge_scores=r.judge_scores,
            quality=r.quality,
        )
        for r in items
    )
    for scope, table in (("trait", scores.traits), ("facet", scores.facets)):
        session.add_all(
            TraitScore(
                assessment_id=assessment_id,
                scope=scope,
                key=key,
                mean=values["mean"],
                sd=values["sd"],
                n_runs=values["n_runs"],
                coverage=values.get("coverage"),
                n_answered=values.get("n_answered"),
                n_asked=values.get("n_asked"),
                z=values["z"],
            )
            for key, values in table.items()
        )


def fail(session: Session, assessment_id: str, error: str) -> None:
    session.execute(
        update(Assessment)
        .where(Assessment.id == assessment_id, Assessment.state.in_([AssessmentState.QUEUED, AssessmentState.RUNNING]))
        .values(state=AssessmentState.FAILED, error=error[-4000:], finished_at=utcnow())
    )


def run_values(session: Session, assessment_ids: Sequence[str]) -> dict[str, list[dict[str, float | None]]]:
    """Each assessment's answers (before reverse keying), one ``item_id -> value`` mapping per run."""
    out: dict[str, list[dict[str, float | None]]] = {}
    if not assessment_ids:
        return out
    rows = session.execute(
        select(ItemResponse.assessment_id, ItemResponse.run, ItemResponse.item_id, ItemResponse.value).where(
            ItemResponse.assessment_id.in_(list(assessment_ids))
        )
    )
    for assessment_id, run, item_id, value in rows:
        runs = out.setdefault(assessment_id, [])
        while len(runs) <= run:
            runs.append({})
        runs[run][item_id] = value
    return out
