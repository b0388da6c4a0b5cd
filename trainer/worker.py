"""The training worker: claims jobs from the database queue, trains, publishes adapters.

Several workers on several machines can share one database and one adapter store. A worker that
dies loses its lease; after ``lease_seconds`` another worker claims the job and resumes from the
last checkpoint. Adapters already published by an earlier attempt are recorded in the job row and
skipped. A job whose workers die on every attempt ends ``failed`` after ``max_attempts``.

Each attempt writes its checkpoints to a folder of its own, ``checkpoints/<job>/attempt-<n>/<adapter>``
(recorded in the job's ``checkpoint_dir``), and resumes explicitly from the newest complete
checkpoint of the attempts before it (recorded in the job's progress as ``resumed_from``; a
checkpoint is complete once its marker is written, :mod:`trainer.checkpoints`). The heartbeat
thread (:mod:`trainer.lease`) notices a lost lease or a cancel; training then stops at the end of the
current step, and nothing is published. A worker that cannot renew its lease at all (database down, network cut)
stops the same way on its own clock, before the lease can expire: once no renewal has succeeded
for ``(lease_seconds + heartbeat_seconds) / 2`` seconds. So a worker cut off from the database never
trains on, or writes checkpoints, while a new owner resumes from them; and on any failure a
worker removes only its own attempt's staging folder.

Under ``accelerate launch`` the worker is the main rank of a group (``trainer.ranks``): it alone uses
the database and the adapter store, and tells the other ranks what to train.
"""

from __future__ import annotations

import functools
import logging
import shutil
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from big5core import jobs
from big5core.datagen import DATAGEN_KIND, DatagenError, TraitScorer
from big5core.db import Database, transaction
from big5core.heartbeat import owner_id
from big5core.migrate import open_database
from big5core.models import TrainingJob
from big5core.settings import Settings
from big5core.training import STEER_KIND, SteerSpec, TrainSpec
from big5engine.modelstore import base_model_id, resolve_base_model
from big5personas import registry
from trainer.checkpoints import ATTEMPT_PREFIX, resume_point
from trainer.dataset import DatasetError
from trainer.lease import JobCancelled, LeaseHeartbeat, LeaseLost, check_lease_settings
from trainer.liveness import Liveness
from trainer.ranks import Order, RankGroup, RanksOutOfStep

logger = logging.getLogger(__name__)


class Worker:
    """Runs queued jobs. ``db``: a database the caller opened and closes (shared with what queued the job);
    without one the worker opens its own, which :meth:`close` disposes."""

    def __init__(
        self,
        settings: Settings,
        owner: str | None = None,
        group: RankGroup | None = None,
        *,
        db: Database | None = None,
    ) -> None:
        self.settings = settings
        self.group = group  # the other ranks of an `accelerate launch`, led by this worker
        self.owner = owner or owner_id()
        check_lease_settings(settings)
        self._owned = db is None
        self.db = open_database(settings) if db is None else db
        self.engine = self.db.engine
        self.sessions = self.db.sessions
        self.judge: TraitScorer | None = None  # datagen jobs' trait judge, set by the composition root
        self.liveness: Liveness | None = None  # `big5 worker --liveness-file`: its own heartbeat, for a healthcheck

    def close(self) -> None:
        """Dispose the worker's database engine if it opened it (a ``db`` given to it stays open)."""
        if self._owned:
            self.db.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------------ loop
    def run(self, *, once: bool = False, max_jobs: int | None = None, exit_when_idle: bool = False) -> int:
        """Process jobs until stopped; returns how many were processed."""
        done = 0
        while max_jobs is None or done < max_jobs:
            if self.liveness is not None:
                self.liveness.touch()
            self._reap()
            leased_at = time.monotonic()
            with transaction(self.sessions) as session:
                job = jobs.claim_next(session, self.owner, self.settings.trainer.lease_seconds)
                job_id, attempt = (job.id, job.attempts) if job else (None, 0)
            if job_id is None:
                if once or exit_when_idle:
                    break
                self._wait()
                continue
            self.process(job_id, attempt=attempt, leased_at=leased_at)
            done += 1
            if once:
                break
        return done

    def run_job(self, job_id: str) -> None:
        """Process this job (waiting while another worker holds it) until it has ended."""
        while True:
            with self.sessions() as session:
                if jobs.get_job(session, job_id).state not in ("queued", "running"):
                    return
            self._reap()
            leased_at = time.monotonic()
            with transaction(self.sessions) as session:
                claimed = jobs.claim_next(session, self.owner, self.settings.trainer.lease_seconds, job_id)
                attempt = claimed.attempts if claimed is not None else 0
            if claimed is not None:
                self.process(job_id, attempt=attempt, leased_at=leased_at)
            else:
                self._wait()  # another worker holds it

    def _reap(self) -> None:
        """Fail the jobs whose workers died on every attempt; remove their staging (checkpoints stay)."""
        with transaction(self.sessions) as session:
            reaped = jobs.reap_exhausted(session)
        for job_id in reaped:
            logger.warning("Job %s: its worker died on every attempt; failed (checkpoints kept)", job_id)
            self._remove_staging_of(job_id)

    def _wait(self) -> None:
        if self.group is not None:
            self.group.send(Order("idle"))  # keeps the other ranks' wait short
        time.sleep(self.settings.trainer.poll_seconds)

    # ------------------------------------------------------------------ one job
    def process(self, job_id: str, *, attempt: int | None = None, leased_at: float | None = None) -> str:
        """Run the job this worker claimed as ``attempt`` (default: the row's current attempt count).

        ``leased_at``: when the claim was sent (``time.monotonic()``), where the lease starts running.
        """
        with self.sessions() as session:
            job = jobs.get_job(session, job_id)
            raw_spec, result = dict(job.spec), dict(job.result or {})
            attempt = job.attempts if attempt is None else attempt
        logger.info("Job %s: attempt %d by %s", job_id, attempt, self.owner)
        self._remove_staging_of(job_id, before_attempt=attempt)
        attempt_dir = self._job_checkpoints(job_id) / f"{ATTEMPT_PREFIX}{attempt}"
        beat = LeaseHeartbeat(self.sessions, job_id, self.owner, self.settings, leased_at)
        if self.liveness is not None:
            beat.on_renewed = functools.partial(self.liveness.touch, job_id)
        beat.update({"attempt": attempt, "phase": "loading data", "checkpoint_dir": str(attempt_dir)})
        with transaction(self.sessions) as session:
            jobs.start_attempt(session, job_id, self.owner, str(attempt_dir))
        beat.beat()
        beat.start()
        try:
            beat.check()
            if raw_spec.get("kind") == STEER_KIND:  # issue 27: steering-vector extraction shares the queue
                from trainer.steering_job import run_steer_job

                state = run_steer_job(self.sessions, self.settings, self.owner, job_id, raw_spec, beat)
            elif raw_spec.get("kind") == DATAGEN_KIND:  # issue 16: data generation shares the queue
                from trainer.datagen.job import run_datagen_job

                state = run_datagen_job(
                    self.sessions, self.settings, self.owner, job_id, raw_spec, beat,
                    judge=self.judge, show_progress_bar=sys.stderr.isatty(),
                )  # fmt: skip
            else:
                spec = TrainSpec.model_validate(raw_spec)
                state = self._train_all(job_id, spec, result, beat, attempt, attempt_dir)
        except (DatasetError, DatagenError, ValidationError, registry.RegistryError) as exc:
            state = self._fail(job_id, attempt, f"{type(exc).__name__}: {exc}", retryable=False)
        except RanksOutOfStep as exc:
            logger.exception("Job %s failed while the ranks trained together; ending the launch", job_id)
            self._fail(job_id, attempt, f"{exc}: {exc.__cause__!r}\n{traceback.format_exc()}", retryable=True)
            raise
        except LeaseLost as exc:
            logger.warning("Job %s: %s; abandoning attempt %d", job_id, exc, attempt)
            self._remove_staging_of(job_id, attempt=attempt)  # checkpoints stay: the new owner may resume
            state = "lost"
        except JobCancelled:
            logger.warning("Job %s: cancelled; nothing more is published", job_id)
            self._remove_staging_of(job_id, attempt=attempt)
            shutil.rmtree(self._job_checkpoints(job_id), ignore_errors=True)
            state = "cancelled"
        except Exception as exc:
            logger.exception("Job %s failed", job_id)
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            state = self._fail(job_id, attempt, error, retryable=True)
        finally:
            beat.stop()
        logger.info("Job %s: %s", job_id, state)
        return state

    def _init_adapter(self, spec: TrainSpec, target: Any, base_id: str) -> Any:
        """The registry adapter ``spec.init_from`` names for ``target`` (same layout and condition), if any."""
        if spec.init_from is None:
            return None
        name = spec.model_copy(update={"name": spec.init_from}).adapter_name(target)
        with self.sessions() as session:
            adapter = registry.get(session, name)
            if adapter.base_model != base_id:
                raise registry.RegistryError(
                    f"init_from adapter {adapter.ref} is for {adapter.base_model}, not {base_id}"
                )
            registry.verify(adapter)
            session.expunge(adapter)
        logger.info("%s starts from %s", spec.adapter_name(target), adapter.ref)
        return adapter

    def _train_all(
        self,
        job_id: str,
        spec: TrainSpec,
        result: dict[str, Any],
        beat: LeaseHeartbeat,
        attempt: int,
        attempt_dir: Path,
    ) -> str:
        from trainer.train import load_dataset_rows, prepare, train_adapter

        rows, report = load_dataset_rows(spec)  # raises DatasetError before any training step
        logger.info("Job %s: dataset %s\n%s", job_id, spec.dataset, report)
        base_path = resolve_base_model(self.settings)
        base_id = base_model_id(self.settings)
        published: dict[str, str] = dict(result.get("adapters", {}))
        targets = spec.targets()
        for index, target in enumerate(targets):
            name = spec.adapter_name(target)
            if name in published:
                logger.info("Job %s: %s already published as %s", job_id, name, published[name])
                continue
            beat.check()
            data = prepare(spec, rows, report, target)
            init = self._init_adapter(spec, target, base_id)
            if init is not None:
                data.init_adapter = init.path
            checkpoints = attempt_dir / name
            staged = self._staging(job_id, attempt)
            resume = resume_point(self._job_checkpoints(job_id), name, attempt)
            beat.update(
                {
                    "phase": f"training {name}",
                    "adapter": name,
                    "adapter_index": index,
                    "adapters": len(targets),
                    "resumed_from": str(resume) if resume else None,
                }
            )
            if self.group is not None:
                self.group.send(
                    Order(
                        "train",
                        spec=spec,
                        data=data,
                        base_model_path=base_path,
                        checkpoint_dir=checkpoints,
                        resume=str(resume) if resume else None,
                    )
                )
            try:
                outcome = train_adapter(
                    spec,
                    data,
                    base_path,
                    staged,
                    checkpoints,
                    resume=str(resume) if resume else None,
                    progress=beat.update,
                    show_progress_bar=sys.stderr.isatty(),
                    should_stop=beat.stop_reason,
                )
            except Exception as exc:
                if self.group is not None:
                    raise RanksOutOfStep(f"training {name} on rank 0 of {self.group.world_size}") from exc
                raise
            if outcome.stopped is not None or beat.lost:
                logger.warning(
                    "Job %s: %s stopped at step %d (%s); not published",
                    job_id,
                    name,
                    outcome.steps,
                    outcome.stopped or beat.stop_reason(),
                )
                shutil.rmtree(staged, ignore_errors=True)
                beat.check()
                raise LeaseLost(job_id)  # stopped on another rank's word: treat as lost
            traits = {target[0].value: target[1].value} if target else {c: "trained" for c in spec.conditions}
            try:
                beat.check()  # not renewed in time: another worker may hold the job by now; publish nothing
            except (LeaseLost, JobCancelled):
                shutil.rmtree(staged, ignore_errors=True)
                raise
            with transaction(self.sessions) as session:
                if not jobs.hold(session, job_id, self.owner):  # locks the row: a cancel now waits for us
                    shutil.rmtree(staged, ignore_errors=True)
                    if jobs.lease_state(session, job_id, self.owner) is jobs.LeaseState.CANCELLED:
                        raise JobCancelled(job_id)
                    raise LeaseLost(job_id)
                adapter = registry.publish(
                    session,
                    staged,
                    self.settings.adapters_dir,
                    name=name,
                    base_model=base_id,
                    method=spec.method,
                    layout=spec.layout,
                    traits=traits,
                    hyperparams={
                        **spec.model_dump(mode="json", exclude={"conditions", "dataset", "name"}),
                        "dataset": spec.dataset,
                        "conditions": spec.conditions if target is None else [f"{target[0].value}:{target[1].value}"],
                        "steps": outcome.steps,
                        "train_examples": len(data.train),
                        # after the trainer's own filter (TRL's DPO drops pairs whose prompt fills max_length)
                        "trained_examples": outcome.trained_examples,
                        "train_tokens": outcome.train_tokens,
                        "seconds": round(outcome.seconds, 2),
                        "world_size": outcome.world_size,
                        "global_batch_size": spec.per_device_train_batch_size
                        * spec.gradient_accumulation_steps
                        * outcome.world_size,
                        "job_id": job_id,
                        "attempt": attempt,
                        "resumed_from": str(resume) if resume else None,
                    },
                    dataset_hash=data.dataset_hash,
                    train_loss=outcome.train_loss,
                    eval_loss=outcome.eval_loss,
                    max_rank=self.settings.engine.max_lora_rank,
                )
                try:
                    published[name] = adapter.ref
                    if not jobs.record_result(session, job_id, self.owner, {"adapters": published}, beat.snapshot()):
                        raise LeaseLost(job_id)  # cannot happen while hold() locks the row; rolls back if it does
                except BaseException:
                    registry.discard(adapter)  # the row is rolled back: its files must not stay
                    raise
        with transaction(self.sessions) as session:
            if not jobs.succeed(
                session, job_id, self.owner, {"adapters": published}, {**beat.snapshot(), "phase": "done"}
            ):
                if jobs.lease_state(session, job_id, self.owner) is jobs.LeaseState.CANCELLED:
                    raise JobCancelled(job_id)  # all adapters were published before the cancel
                raise LeaseLost(job_id)
        shutil.rmtree(self._job_checkpoints(job_id), ignore_errors=True)
        return "succeeded"

    # ------------------------------------------------------------------ helpers
    def _job_checkpoints(self, job_id: str) -> Path:
        return self.settings.data_dir / "checkpoints" / job_id

    def _fail(self, job_id: str, attempt: int, error: str, *, retryable: bool) -> str:
        """Record the failure (if this worker still holds the job); remove this attempt's staging only.

        Another worker may hold the job by now (this one's lease expired): its staging folder stays.
        """
        try:
            with transaction(self.sessions) as session:
                state = jobs.fail(session, job_id, self.owner, error, retryable=retryable)
        finally:
            self._remove_staging_of(job_id, attempt=attempt)
        if state == "failed":
            logger.warning("Job %s failed; its checkpoints (if any) stay in %s", job_id, self._job_checkpoints(job_id))
        return state

    def _staging(self, job_id: str, attempt: int) -> Path:
        self.settings.adapters_dir.mkdir(parents=True, exist_ok=True)
        path = self.settings.adapters_dir / f"{registry.STAGING_PREFIX}{job_id}-a{attempt}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def _remove_staging_of(self, job_id: str, *, attempt: int | None = None, before_attempt: int | None = None) -> None:
        """Remove staging folders of this job: all, one attempt's, or those of the attempts before one.

        A new attempt removes only its predecessors' (their owners lost the lease), never a live one's.
        """
        if not self.settings.adapters_dir.is_dir():
            return
        for path in self.settings.adapters_dir.glob(f"{registry.STAGING_PREFIX}{job_id}-*"):
            tag = path.name[len(registry.STAGING_PREFIX) + len(job_id) + 1 :].split("-", 1)[0]
            number = int(tag[1:]) if tag[:1] == "a" and tag[1:].isdigit() else 0
            if attempt is not None and number != attempt:
                continue
            if before_attempt is not None and number >= before_attempt:
                continue
            shutil.rmtree(path, ignore_errors=True)


def submit(settings: Settings, spec: TrainSpec | SteerSpec, *, db: Database | None = None) -> str:
    """Queue a job; returns its id. Without ``db`` a database is opened for it and closed again."""
    if db is None:
        with open_database(settings) as own:
            return submit(settings, spec, db=own)
    with transaction(db.sessions) as session:
        job = jobs.create_job(session, spec, max_attempts=settings.trainer.max_attempts)
        return job.id


def job_snapshot(sessions: sessionmaker[Session], job_id: str) -> TrainingJob:
    with sessions() as session:
        job = jobs.get_job(session, job_id)
        session.expunge(job)
        return job
