"""Data generation as a job of the training queue: resolve experts, generate, record the result.

The worker hands a claimed job whose spec says ``"kind": "datagen"`` to :func:`run_datagen_job`.
The job keeps the queue's rules: the lease is renewed by the worker's heartbeat (progress: rows
done, rows/s), a cancelled job or a lost lease stops the run after the current batch (the part
file stays, so the next attempt resumes after its last row), and the job succeeds only after the
output file is in place. A bad spec, scenarios file or expert reference fails it at once (not
retried): pydantic's ``ValidationError``, :class:`~big5core.datagen.DatagenError` (a dataset error)
and the registry's errors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from big5core import jobs
from big5core.datagen import DatagenError, DatagenSpec, TraitScorer
from big5core.db import Database, transaction
from big5core.settings import Settings
from big5core.traits import Level, Trait
from big5engine.modelstore import base_model_id, resolve_base_model
from big5personas import registry
from trainer.datagen.generate import Condition, Generator, fingerprint
from trainer.datagen.io import PartFile, read_scenarios
from trainer.datagen.steering import ExpertSource, SteeringModels

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)


def resolve_source(session: Session, text: str, trait: Trait, level: Level, *, base_model: str) -> ExpertSource:
    """What a spec's ``expert``/``antiexpert`` names for one condition (see :class:`DatagenSpec`)."""
    name = text.format(trait=trait.value, level=level.value, opposite=level.opposite.value)
    if name == "prompt":
        return ExpertSource("prompt", "prompt")
    if Path(name).is_dir():
        return ExpertSource("model", str(Path(name).resolve()), path=str(Path(name).resolve()))
    adapter = registry.get(session, name)
    if adapter.base_model != base_model:
        raise DatagenError(f"expert {adapter.ref} was trained on {adapter.base_model}, not on the base {base_model}")
    registry.verify(adapter)
    return ExpertSource("adapter", adapter.ref, path=adapter.path, sha256=adapter.sha256, layout=adapter.layout)


def resolve_conditions(session: Session, spec: DatagenSpec, *, base_model: str) -> list[Condition]:
    out = []
    for trait, level in spec.parsed_conditions():
        expert = resolve_source(session, spec.expert, trait, level, base_model=base_model)
        anti = None
        if spec.antiexpert is not None:
            anti = resolve_source(session, spec.antiexpert, trait, level, base_model=base_model)
        out.append(Condition(trait, level, expert, anti))
    return out


def output_path(settings: Settings, spec: DatagenSpec, job_id: str) -> Path:
    return Path(spec.output) if spec.output else settings.datasets_dir / f"datagen-{job_id}.csv"


def run_datagen_job(
    sessions: sessionmaker[Session],
    settings: Settings,
    owner: str,
    job_id: str,
    raw_spec: dict[str, Any],
    beat: Any,
    *,
    judge: TraitScorer | None = None,
    show_progress_bar: bool = False,
) -> str:
    """Run one claimed datagen job to the end; returns "succeeded" (raises on failure, as training does).

    ``beat`` is the worker's heartbeat: ``update(progress)``, ``snapshot()`` and ``check()`` (raises
    when the job was cancelled or the lease lost).
    """
    spec = DatagenSpec.model_validate(raw_spec)
    scenarios = read_scenarios(spec.scenarios, spec.limit)
    base_path = resolve_base_model(settings)
    base_id = base_model_id(settings)
    with sessions() as session:
        conditions = resolve_conditions(session, spec, base_model=base_id)
    out = output_path(settings, spec, job_id)
    part = PartFile(out, fingerprint(spec, base_id, conditions))
    beat.update({"phase": "loading models", "output": str(out)})
    if judge is None:
        logger.warning("Job %s: no trait judge given; rows get no judge_p_target", job_id)
    generator = Generator(spec, SteeringModels(base_path), conditions, base_model=base_id, judge=judge)
    summary = generator.run(
        scenarios, part, progress=beat.update, check=beat.check, show_progress_bar=show_progress_bar
    )
    beat.check()
    result = summary.as_dict()
    with transaction(sessions) as session:
        if not jobs.succeed(session, job_id, owner, result, {**beat.snapshot(), "phase": "done"}):
            beat.check()
            raise RuntimeError(f"job {job_id}: could not record success")
    part.remove()
    logger.info(
        "Job %s: %d rows (%d kept) in %.1f s, %.2f rows/s -> %s",
        job_id, summary.total, summary.kept, summary.seconds, summary.rows_per_s, summary.output,
    )  # fmt: skip
    return "succeeded"


def submit(settings: Settings, spec: DatagenSpec, *, db: Database | None = None) -> str:
    """Queue a datagen job; returns its id. Without ``db`` a database is opened for it and closed again."""
    if db is None:
        from big5core.migrate import open_database

        with open_database(settings) as own:
            return submit(settings, spec, db=own)
    with transaction(db.sessions) as session:
        return jobs.create_job(session, spec, max_attempts=settings.trainer.max_attempts).id
