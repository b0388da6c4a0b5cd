"""Reasoning runs in the database. Functions take a session and never commit (the caller does)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, selectinload

from big5core.models import ReasoningItem, ReasoningResult, ReasoningRun, ReasoningState, utcnow
from evaluator.reasoning.errors import ReasoningRunNotFound

if TYPE_CHECKING:
    from evaluator.reasoning.harness import UnitResult


class UnitAlreadyStored(RuntimeError):
    """The (run, task, persona) unit is stored already (a second writer lost the race)."""


def create(
    session: Session,
    *,
    personas: list[str],
    tasks: list[str],
    limit: int | None,
    options: dict[str, Any],
    lm_eval_version: str,
    progress: dict[str, Any],
) -> ReasoningRun:
    run = ReasoningRun(
        personas=personas,
        tasks=tasks,
        item_limit=limit,
        options=options,
        lm_eval_version=lm_eval_version,
        progress=progress,
        state=ReasoningState.QUEUED,
    )
    session.add(run)
    session.flush()
    return run


def get(session: Session, run_id: str) -> ReasoningRun:
    run = session.scalar(
        select(ReasoningRun).where(ReasoningRun.id == run_id).options(selectinload(ReasoningRun.results))
    )
    if run is None:
        raise ReasoningRunNotFound(f"unknown reasoning run {run_id}")
    return run


def search(session: Session, *, state: str | None = None, limit: int = 100, offset: int = 0) -> Sequence[ReasoningRun]:
    query = select(ReasoningRun).options(selectinload(ReasoningRun.results)).order_by(ReasoningRun.created_at.desc())
    if state:
        query = query.where(ReasoningRun.state == state)
    return session.scalars(query.limit(limit).offset(offset)).all()


def stored_units(session: Session, run_id: str) -> set[tuple[str, str]]:
    rows = session.execute(
        select(ReasoningResult.task, ReasoningResult.persona_key).where(ReasoningResult.run_id == run_id)
    )
    return {(task, key) for task, key in rows}


def mark_running(session: Session, run_id: str, progress: dict[str, Any], lease: dict[str, Any]) -> None:
    """Start (or resume) the run under the runner's ``lease`` (``big5core.lease.taken``): a resume takes it over."""
    session.execute(
        update(ReasoningRun)
        .where(ReasoningRun.id == run_id)
        .values(
            state=ReasoningState.RUNNING, started_at=utcnow(), finished_at=None, error=None, progress=progress, **lease
        )
    )


def add_unit(session: Session, run_id: str, unit: UnitResult) -> ReasoningResult:
    """Store one unit and all its items (call inside ONE transaction with nothing else half-written)."""
    if (unit.task, unit.persona_key) in stored_units(session, run_id):
        raise UnitAlreadyStored(f"run {run_id}: {unit.task} for {unit.persona_key} is stored already")
    result = ReasoningResult(
        run_id=run_id,
        task=unit.task,
        lm_task=unit.lm_task,
        persona_key=unit.persona_key,
        method=unit.method,
        resolved_persona=unit.resolved_persona,
        lm_eval_version=unit.lm_eval_version,
        task_config_hash=unit.task_config_hash,
        task_config=unit.task_config,
        metrics=unit.metrics,
        n_items=len(unit.items),
        seconds=unit.seconds,
    )
    result.items = [ReasoningItem(**dataclasses.asdict(i)) for i in unit.items]  # ItemResult: the item columns
    session.add(result)
    session.flush()
    return result


def complete(session: Session, run_id: str, expected_units: int) -> bool:
    """Mark the run done if every unit is stored and it is still running; False otherwise (left as it is)."""
    count = session.scalar(select(func.count()).select_from(ReasoningResult).where(ReasoningResult.run_id == run_id))
    if count != expected_units:
        return False
    done = session.execute(
        update(ReasoningRun)
        .where(ReasoningRun.id == run_id, ReasoningRun.state == ReasoningState.RUNNING)
        .values(state=ReasoningState.DONE, finished_at=utcnow())
    )
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


def fail(session: Session, run_id: str, error: str) -> bool:
    """Mark a queued or running run failed; False when it was neither (left as it is)."""
    failed = session.execute(
        update(ReasoningRun)
        .where(ReasoningRun.id == run_id, ReasoningRun.state.in_([ReasoningState.QUEUED, ReasoningState.RUNNING]))
        .values(state=ReasoningState.FAILED, error=error[-4000:], finished_at=utcnow())
    )
    return bool(failed.rowcount == 1)  # type: ignore[attr-defined]


def items(
    session: Session, run_id: str, *, task: str | None = None, persona_key: str | None = None
) -> Sequence[tuple[ReasoningResult, ReasoningItem]]:
    get(session, run_id)
    query = (
        select(ReasoningResult, ReasoningItem)
        .join(ReasoningItem, ReasoningItem.result_id == ReasoningResult.id)
        .where(ReasoningResult.run_id == run_id)
        .order_by(ReasoningResult.id, ReasoningItem.doc_index)
    )
    if task:
        query = query.where(ReasoningResult.task == task)
    if persona_key:
        query = query.where(ReasoningResult.persona_key == persona_key)
    return [(r, i) for r, i in session.execute(query).tuples()]


def unit_scores(session: Session, run_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per stored unit of done runs (or the given runs): task, persona, resolved traits and item scores."""
    query = select(ReasoningResult).options(selectinload(ReasoningResult.items)).join(ReasoningRun)
    if run_ids:
        query = query.where(ReasoningResult.run_id.in_(list(run_ids)))
    else:
        query = query.where(ReasoningRun.state == ReasoningState.DONE)
    out = []
    for result in session.scalars(query.order_by(ReasoningResult.created_at)):
        out.append(
            {
                "run_id": result.run_id,
                "task": result.task,
                "persona_key": result.persona_key,
                "method": result.method,
                "traits": dict((result.resolved_persona or {}).get("traits") or {}),
                "task_config_hash": result.task_config_hash,
                "scores": {i.item_id: i.score for i in result.items},
                "correct": {i.item_id: i.correct for i in result.items},
            }
        )
    return out
