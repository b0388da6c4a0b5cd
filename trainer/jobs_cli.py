"""``big5 jobs list|show|cancel``: the training-job queue from a terminal (the database directly)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from big5core.models import TrainingJob

jobs_app = typer.Typer(no_args_is_help=True, help="Training jobs: list, show, cancel.")


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")


@contextmanager
def _session() -> Iterator[Session]:
    from big5core.migrate import open_database
    from big5core.settings import get_settings

    with open_database(get_settings()) as db, db.sessions() as session:
        yield session


def _summary(job: TrainingJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "lease_owner": job.lease_owner,
        "lease_expires_at": job.lease_expires_at.isoformat() if job.lease_expires_at else None,
        "checkpoint_dir": job.checkpoint_dir,
        "progress": job.progress,
        "result": job.result,
        "error": job.error,
        "spec": job.spec,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def _get(session: Session, job_id: str) -> TrainingJob:
    from big5core import jobs

    try:
        return jobs.get_job(session, job_id)
    except jobs.JobNotFound as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


@jobs_app.command("list")
def list_jobs(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
) -> None:
    """List recent training jobs."""
    from big5core import jobs

    with _session() as session:
        for job in jobs.list_jobs(session, state=state, limit=limit):
            step = (job.progress or {}).get("step")
            total = (job.progress or {}).get("total_steps")
            where = f" step {step}/{total}" if step is not None else ""
            typer.echo(f"{job.id}  {job.state:<10} attempt {job.attempts}/{job.max_attempts}{where}")


@jobs_app.command("show")
def show_job(job_id: str) -> None:
    """Everything about one job, as JSON."""
    with _session() as session:
        typer.echo(json.dumps(_summary(_get(session, job_id)), indent=2))


@jobs_app.command("cancel")
def cancel_job(job_id: str) -> None:
    """Cancel a queued or running job; a running one stops at the end of its current training step."""
    from big5core import jobs

    with _session() as session:
        _get(session, job_id)
        try:
            job = jobs.cancel(session, job_id)
        except jobs.JobConflict as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(1) from None
        session.commit()
        typer.echo(f"{job.id}  {job.state}")
