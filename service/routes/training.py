"""Admin: queue training jobs (a worker picks them up), follow them, cancel them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response, status

from big5core import jobs
from big5core.training import TrainSpec
from service.deps import SessionDep, StateDep, require_admin
from service.schemas import JobAccepted, JobOut, problems

router = APIRouter(prefix="/v1/training-jobs", tags=["training"], dependencies=[Depends(require_admin)])


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=JobAccepted, responses=problems(401, 403, 413, 422)
)
def create_training_job(spec: TrainSpec, session: SessionDep, state: StateDep, response: Response) -> JobAccepted:
    """Queue a training run; ``trainer`` workers claim it. Poll the Location for progress."""
    job = jobs.create_job(session, spec, max_attempts=state.settings.trainer.max_attempts)
    session.commit()
    response.headers["Location"] = f"/v1/training-jobs/{job.id}"
    return JobAccepted(id=job.id, state=job.state)


@router.get("/{job_id}", response_model=JobOut, responses=problems(401, 403, 404))
def get_training_job(job_id: str, session: SessionDep) -> JobOut:
    """State, attempts, progress, error and result (the adapters it registered)."""
    return JobOut.model_validate(jobs.get_job(session, job_id), from_attributes=True)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=problems(401, 403, 404, 409))
def cancel_training_job(job_id: str, session: SessionDep) -> JobOut:
    """Cancel a queued or running job. A running one stops at its worker's next heartbeat, at the end of
    the current training step; an adapter is either fully published before the cancel or not at all.
    Cancelling a cancelled job changes nothing; a job that already succeeded or failed is a 409."""
    job = jobs.cancel(session, job_id)
    session.commit()
    return JobOut.model_validate(job, from_attributes=True)
