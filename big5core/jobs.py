"""The training-job queue in the database: create, claim (SKIP LOCKED), lease, finish, fail, cancel.

Repository functions take a session and never commit; the worker owns the transactions.
Claiming is a compare-and-set on (state, lease): on PostgreSQL the candidate row is also locked
with ``FOR UPDATE SKIP LOCKED`` so concurrent workers never wait on each other; on SQLite the
conditional UPDATE alone makes the claim atomic.

The lease is the one every background row has (:mod:`big5core.lease`, on the database's clock). A job whose
lease expired on its last allowed attempt is not claimed again: :func:`reap_exhausted` ends it
``failed`` with the reason (its checkpoints stay on disk for inspection).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import and_, case, false, func, or_, select, true, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ColumnElement

from big5core import lease
from big5core.datagen import DatagenSpec
from big5core.errors import Conflict, NotFound
from big5core.lease import db_now
from big5core.models import JobState, TrainingJob
from big5core.training import SteerSpec, TrainSpec

ACTIVE = (JobState.QUEUED, JobState.RUNNING)


class JobNotFound(NotFound):
    code, title = "training-job-not-found", "Unknown training job"


class JobConflict(Conflict, RuntimeError):
    """The job's state does not allow the operation (e.g. cancelling a job that already succeeded)."""

    code, title = "training-job-conflict", "The training job's state does not allow this"


class LeaseState(StrEnum):
    HELD = "held"
    LOST = "lost"  # another worker holds it, or it was reaped
    CANCELLED = "cancelled"


def create_job(session: Session, spec: TrainSpec | DatagenSpec | SteerSpec, *, max_attempts: int = 3) -> TrainingJob:
    job = TrainingJob(
        spec=spec.model_dump(mode="json"), max_attempts=max_attempts, state=JobState.QUEUED, created_at=db_now()
    )
    session.add(job)
    session.flush()
    session.refresh(job, ["created_at"])
    return job


def get_job(session: Session, job_id: str) -> TrainingJob:
    job = session.get(TrainingJob, job_id)
    if job is None:
        raise JobNotFound(f"unknown training job {job_id}")
    return job


def list_jobs(session: Session, *, state: str | None = None, limit: int = 20) -> list[TrainingJob]:
    query = select(TrainingJob).order_by(TrainingJob.created_at.desc(), TrainingJob.id).limit(limit)
    if state:
        query = query.where(TrainingJob.state == state)
    return list(session.scalars(query))


def _expired() -> ColumnElement[bool]:
    return and_(TrainingJob.state == JobState.RUNNING, lease.expired(TrainingJob))


def _claimable() -> ColumnElement[bool]:
    """Queued, or running with an expired lease (its worker died) and attempts left."""
    return or_(
        TrainingJob.state == JobState.QUEUED,
        and_(_expired(), TrainingJob.attempts < TrainingJob.max_attempts),
    )


def reap_exhausted(session: Session) -> list[str]:
    """End ``failed`` every running job whose lease expired on its last allowed attempt.

    Such a job's worker died (or hung) ``max_attempts`` times, e.g. OOM-killed on every attempt;
    claiming it again would loop forever. Its checkpoints are left for inspection. Returns the ids.
    """
    exhausted = and_(_expired(), TrainingJob.attempts >= TrainingJob.max_attempts)
    candidates = session.execute(
        select(
            TrainingJob.id,
            TrainingJob.attempts,
            TrainingJob.max_attempts,
            TrainingJob.lease_owner,
            TrainingJob.checkpoint_dir,
        )
        .where(exhausted)
        .with_for_update(skip_locked=True)
    ).all()
    reaped: list[str] = []
    for job_id, attempts, max_attempts, owner, checkpoint_dir in candidates:
        error = (
            f"the lease expired on attempt {attempts} of {max_attempts}: worker {owner} stopped renewing it "
            "(killed or hung) on every attempt; not retried"
            + (f". Checkpoints kept for inspection in {checkpoint_dir}" if checkpoint_dir else "")
        )
        result = session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == job_id, exhausted)
            .values(state=JobState.FAILED, error=error, lease_expires_at=None, finished_at=db_now())
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            reaped.append(job_id)
    return reaped


def claim_next(session: Session, owner: str, lease_seconds: int, job_id: str | None = None) -> TrainingJob | None:
    """Take the oldest queued job (or ``job_id``), or a running one whose lease expired (its worker died).

    Jobs that used up their attempts are reaped first (:func:`reap_exhausted`), never claimed.
    """
    reap_exhausted(session)
    query = select(TrainingJob).where(_claimable())
    if job_id is not None:
        query = query.where(TrainingJob.id == job_id)
    candidate = session.scalars(
        query.order_by(TrainingJob.created_at).limit(1).with_for_update(skip_locked=True)
    ).first()
    if candidate is None:
        return None
    claimed = session.execute(
        update(TrainingJob)
        .where(TrainingJob.id == candidate.id, _claimable())
        .values(
            state=JobState.RUNNING,
            **lease.taken(owner, lease_seconds),
            heartbeat_at=db_now(),
            attempts=TrainingJob.attempts + 1,
            started_at=func.coalesce(TrainingJob.started_at, db_now()),
            error=None,
        )
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:
        return None
    session.refresh(candidate)
    return candidate


def _update_owned(session: Session, job_id: str, owner: str, values: dict[str, Any]) -> bool:
    """UPDATE the job only while ``owner`` still holds it running; False when the lease was lost.

    The UPDATE also locks the row until the caller's transaction ends (on SQLite: the database),
    so a concurrent :func:`cancel` or claim waits for it.
    """
    return lease.update_owned(session, TrainingJob, job_id, owner, [JobState.RUNNING], values)


def heartbeat(
    session: Session, job_id: str, owner: str, lease_seconds: int, progress: dict[str, Any] | None = None
) -> bool:
    """Renew the lease (and record progress); False when the lease was lost or the job cancelled."""
    values: dict[str, Any] = {"heartbeat_at": db_now()}
    if progress is not None:
        values["progress"] = progress
    return lease.renew(session, TrainingJob, job_id, owner, lease_seconds, [JobState.RUNNING], values)


def hold(session: Session, job_id: str, owner: str) -> bool:
    """Lock the job for the rest of the transaction if ``owner`` still holds it (before publishing)."""
    return _update_owned(session, job_id, owner, {"heartbeat_at": db_now()})


def lease_state(session: Session, job_id: str, owner: str) -> LeaseState:
    """Whether ``owner`` still holds the job, lost it, or the job was cancelled."""
    row = session.execute(select(TrainingJob.state, TrainingJob.lease_owner).where(TrainingJob.id == job_id)).first()
    if row is None:
        return LeaseState.LOST
    if row.state == JobState.CANCELLED:
        return LeaseState.CANCELLED
    if row.state == JobState.RUNNING and row.lease_owner == owner:
        return LeaseState.HELD
    return LeaseState.LOST


def start_attempt(session: Session, job_id: str, owner: str, checkpoint_dir: str) -> bool:
    """Record where this attempt writes its checkpoints."""
    return _update_owned(session, job_id, owner, {"checkpoint_dir": checkpoint_dir})


def record_result(
    session: Session, job_id: str, owner: str, result: dict[str, Any], progress: dict[str, Any] | None = None
) -> bool:
    """Store the adapters finished so far (so a resumed job skips them) and the latest progress."""
    values: dict[str, Any] = {"result": result}
    if progress is not None:
        values["progress"] = progress
    return _update_owned(session, job_id, owner, values)


def succeed(
    session: Session, job_id: str, owner: str, result: dict[str, Any], progress: dict[str, Any] | None = None
) -> bool:
    values: dict[str, Any] = {"state": JobState.SUCCEEDED, "result": result, "finished_at": db_now()}
    if progress is not None:
        values["progress"] = progress
    return _update_owned(session, job_id, owner, {"lease_expires_at": None, **values})


def fail(session: Session, job_id: str, owner: str, error: str, *, retryable: bool) -> str:
    """Record a failure: back to the queue while attempts remain (if retryable), else failed.

    One compare-and-set UPDATE (owner and state in its WHERE), on SQLite as on PostgreSQL: a cancel
    or a claim that lands first is never overwritten. Returns the new state, or ``"cancelled"`` /
    ``"lost"`` when this owner no longer held the job running.
    """
    requeue = and_(TrainingJob.attempts < TrainingJob.max_attempts, true() if retryable else false())
    changed = session.execute(
        update(TrainingJob)
        .where(TrainingJob.id == job_id, TrainingJob.lease_owner == owner, TrainingJob.state == JobState.RUNNING)
        .values(
            error=error[-8000:],
            lease_expires_at=None,
            state=case((requeue, JobState.QUEUED.value), else_=JobState.FAILED.value),
            finished_at=case((requeue, TrainingJob.finished_at), else_=db_now()),
        )
        .returning(TrainingJob.state)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if changed is None:
        return LeaseState.CANCELLED.value if lease_state(session, job_id, owner) is LeaseState.CANCELLED else "lost"
    session.expire_all()  # a TrainingJob loaded in this session must not show the old state
    return str(changed)


def cancel(session: Session, job_id: str) -> TrainingJob:
    """Cancel a queued or running job; a running one stops at its worker's next heartbeat and step.

    Cancelling a cancelled job is a no-op; a job that already succeeded or failed raises JobConflict.
    The UPDATE waits for a worker's publish transaction on the row, so an adapter is either fully
    published before the cancel or not at all.
    """
    get_job(session, job_id)
    session.execute(
        update(TrainingJob)
        .where(TrainingJob.id == job_id, TrainingJob.state.in_(ACTIVE))
        .values(state=JobState.CANCELLED, lease_expires_at=None, finished_at=db_now(), error="cancelled")
        .execution_options(synchronize_session=False)
    )
    job = get_job(session, job_id)
    session.refresh(job)
    if job.state in (JobState.SUCCEEDED, JobState.FAILED):
        raise JobConflict(f"training job {job_id} already {job.state}; it cannot be cancelled")
    return job
