"""The steering-vector extraction job: claimed from the training queue like a training job, published once.

Extraction (:func:`trainer.steering.extract_vectors`) runs while the worker's heartbeat keeps the
lease; the vector set is then published and the job marked succeeded in one transaction, under the
job's row lock (:func:`big5core.jobs.hold`), so a crash or a lost lease leaves neither a registry row
nor a succeeded job, only a staging folder that the next attempt or ``sweep_staging`` removes.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from big5core import jobs
from big5core.db import transaction
from big5core.settings import Settings
from big5core.training import SteerSpec
from big5engine.modelstore import base_model_id, resolve_base_model
from big5personas import registry
from trainer.steering import extract_vectors, publish_extraction, training_rows

logger = logging.getLogger(__name__)


def run_steer_job(
    sessions: sessionmaker[Session], settings: Settings, owner: str, job_id: str, raw_spec: dict[str, Any], beat: Any
) -> str:
    """Run one claimed extraction job to the end; returns "succeeded" (raises on failure, as training does)."""
    spec = SteerSpec.model_validate(raw_spec)
    beat.update({"phase": "extracting"})
    extraction = extract_vectors(
        resolve_base_model(settings), training_rows(spec.dataset), rows_per_arm=spec.rows_per_arm, depth=spec.depth
    )
    beat.check()  # cancelled or lost meanwhile: publish nothing
    with transaction(sessions) as session:
        if not jobs.hold(session, job_id, owner):
            beat.check()
            raise RuntimeError(f"job {job_id}: lease lost before publishing")
        row = publish_extraction(
            session, extraction, settings.adapters_dir, name=spec.name, base_model=base_model_id(settings),
            source=spec.dataset, job_id=job_id,
        )  # fmt: skip
        try:
            result = {"adapters": {spec.name: row.ref}, "seconds": extraction.meta["seconds"]}
            if not jobs.succeed(session, job_id, owner, result, {**beat.snapshot(), "phase": "done"}):
                raise RuntimeError(f"job {job_id}: could not record success")
        except BaseException:
            registry.discard(row)  # the row rolls back with the transaction: its files must not stay
            raise
    logger.info("Job %s: vectors %s in %.1f s", job_id, row.ref, extraction.meta["seconds"])
    return "succeeded"
