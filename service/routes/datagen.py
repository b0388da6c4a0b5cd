"""Admin: queue PsychSteer data-generation jobs (DExperts); ``big5 worker`` processes them like training jobs."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Response, status

from big5core import jobs
from big5core.datagen import DatagenError, DatagenSpec
from service.deps import SessionDep, StateDep, require_admin
from service.schemas import JobAccepted, problems

router = APIRouter(prefix="/v1/datagen-jobs", tags=["datagen"], dependencies=[Depends(require_admin)])


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=JobAccepted, responses=problems(400, 401, 403, 413, 422)
)
def create_datagen_job(spec: DatagenSpec, session: SessionDep, state: StateDep, response: Response) -> JobAccepted:
    """Queue a generation run (scenarios file on the workers' storage, experts named by registry refs).

    Follow it at ``/v1/training-jobs/{id}`` (the same queue): progress has rows done and rows/s,
    the result the output file and the gate counts.
    """
    if not Path(spec.scenarios).is_file():
        raise DatagenError(f"no such scenarios file: {spec.scenarios}")
    job = jobs.create_job(session, spec, max_attempts=state.settings.trainer.max_attempts)
    session.commit()
    response.headers["Location"] = f"/v1/training-jobs/{job.id}"
    return JobAccepted(id=job.id, state=job.state)
