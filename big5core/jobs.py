"""The training-job queue in the database: create, claim (SKIP LOCKED), lease, finish, fail.

Repository functions take a session and never commit; the worker owns the transactions.
Claiming is a compare-and-set on (state, lease): on PostgreSQL the candidate row is also locked
with ``FOR UPDATE SKIP LOCKED`` so concurrent workers never wait on each other; on SQLite the
conditional UPDATE alone makes the claim atomic.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from big5core.models import JobState, TrainingJob, utcnow
from big5core.training import TrainSpec


class JobNotFound(LookupError):
    pass


def create_job(session: Session, spec: TrainSpec, *, max_attempts: int = 3) -> TrainingJob:
    job = TrainingJob(spec=spec.model_dump(mode="json"), max_attempts=max_attempts, state=JobState.QUEUED)
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: str) -> TrainingJob:
    job = session.get(TrainingJob, job_id)
    if job is None:
        raise JobNotFound(f"unknown training job {job_id}")
    return job


def _claimable(now: datetime) -> Any:
    return or_(
        TrainingJob.state == JobState.QUEUED,
        (TrainingJob.state == JobState.RUNNING) & (TrainingJob.lease_expires_at < now),
    )


def claim_next(session: Session, owner: str, lease_seconds: int, job_id: str | None = None) -> TrainingJob | None:
    """Take the oldest queued job (or ``job_id``), or a running one whose lease expired (its worker died)."""
    now = utcnow()
    query = select(TrainingJob).where(_claimable(now))
    if job_id is not None:
        query = query.where(TrainingJob.id == job_id)
    candidate = session.scalars(
        query.order_by(TrainingJob.created_at).limit(1).with_for_update(skip_locked=True)
    ).first()
    if candidate is None:
        return None
    claimed = session.execute(
        update(TrainingJob)
        .where(TrainingJob.id == candidate.id, _claimable(now))
        .values(
            state=JobState.RUNNING,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            attempts=TrainingJob.attempts + 1,
            started_at=candidate.started_at or now,
            error=None,
        )
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:
        return None
    session.refresh(candidate)
    return candidate


def _update_owned(session: Session, job_id: str, owner: str, values: dict[str, Any]) -> bool:
    """UPDATE the job only while ``owner`` still holds it running; False when the lease was lost."""
    result = session.execute(
        update(TrainingJob)
        .where(TrainingJob.id == job_id, TrainingJob.lease_owner == owner, TrainingJob.state == JobState.RUNNING)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def heartbeat(
    session: Session, job_id: str, owner: str, lease_seconds: int, progress: dict[str, Any] | None = None
) -> bool:
    """Renew the lease (and record progress); False when the lease was lost to another worker."""
    now = utcnow()
    values: dict[str, Any] = {"heartbeat_at": now, "lease_expires_at": now + timedelta(seconds=lease_seconds)}
    if progress is not None:
        values["progress"] = progress
    return _update_owned(session, job_id, owner, values)


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
    values: dict[str, Any] = {"state": JobState.SUCCEEDED, "result": result, "finished_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    return _update_owned(session, job_id, owner, {"lease_expires_at": None, **values})


def fail(session: Session, job_id: str, owner: str, error: str, *, retryable: bool) -> str:
    """Record a failure: back to the queue while attempts remain (if retryable), else failed."""
    job = session.get(TrainingJob, job_id, with_for_update=True)
    if job is None or job.lease_owner != owner or job.state != JobState.RUNNING:
        return "lost"
    job.error = error[-8000:]
    job.lease_expires_at = None
    if retryable and job.attempts < job.max_attempts:
        job.state = JobState.QUEUED
    else:
        job.state = JobState.FAILED
        job.finished_at = utcnow()
    return job.state


def cancel(session: Session, job_id: str) -> TrainingJob:
    job = get_job(session, job_id)
    if job.state in (JobState.QUEUED, JobState.RUNNING):
        job.state = JobState.CANCELLED
        job.finished_at = utcnow()
    return job
