"""The training worker: claims jobs from the database queue, trains, publishes adapters.

Several workers on several machines can share one database and one adapter store. A worker that
dies loses its lease; after ``lease_seconds`` another worker claims the job and resumes from the
last checkpoint. Adapters already published by an earlier attempt are recorded in the job row and
skipped.

Under ``accelerate launch`` the worker is the main rank of a group (``trainer.ranks``): it alone uses
the database and the adapter store, and tells the other ranks what to train.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from big5core import jobs, migrate, registry
from big5core.db import engine_for, session_factory, transaction
from big5core.models import TrainingJob
from big5core.modelstore import base_model_id, resolve_base_model
from big5core.settings import Settings
from big5core.training import TrainSpec
from trainer.dataset import DatasetError
from trainer.ranks import Order, RankGroup, RanksOutOfStep

logger = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    pass


class _Heartbeat(threading.Thread):
    """Renews the job's lease and writes the latest progress while training runs."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str, owner: str, settings: Settings) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id[:8]}")
        self.sessions = sessions
        self.job_id = job_id
        self.owner = owner
        self.lease = settings.trainer.lease_seconds
        self.interval = settings.trainer.heartbeat_seconds
        self.progress: dict[str, Any] = {}
        self.lost = False
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def update(self, info: dict[str, Any]) -> None:
        with self._lock:
            self.progress = {**self.progress, **info}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.progress)

    def beat(self) -> None:
        with self._lock:
            progress = dict(self.progress)
        try:
            with transaction(self.sessions) as session:
                if not jobs.heartbeat(session, self.job_id, self.owner, self.lease, progress):
                    self.lost = True
        except Exception:  # a database blip must not kill training; the lease covers it
            logger.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._stop_event.set()


class Worker:
    def __init__(self, settings: Settings, owner: str | None = None, group: RankGroup | None = None) -> None:
        self.settings = settings
        self.group = group  # the other ranks of an `accelerate launch`, led by this worker
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        migrate.ensure_current(settings.resolved_database_url)
        self.engine = engine_for(settings)
        self.sessions = session_factory(self.engine)

    # ------------------------------------------------------------------ loop
    def run(self, *, once: bool = False, max_jobs: int | None = None, exit_when_idle: bool = False) -> int:
        """Process jobs until stopped; returns how many were processed."""
        done = 0
        while max_jobs is None or done < max_jobs:
            with transaction(self.sessions) as session:
                job = jobs.claim_next(session, self.owner, self.settings.trainer.lease_seconds)
                job_id = job.id if job else None
            if job_id is None:
                if once or exit_when_idle:
                    break
                self._wait()
                continue
            self.process(job_id)
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
            with transaction(self.sessions) as session:
                claimed = jobs.claim_next(session, self.owner, self.settings.trainer.lease_seconds, job_id)
            if claimed is not None:
                self.process(job_id)
            else:
                self._wait()  # another worker holds it

    def _wait(self) -> None:
        if self.group is not None:
            self.group.send(Order("idle"))  # keeps the other ranks' wait short
        time.sleep(self.settings.trainer.poll_seconds)

    # ------------------------------------------------------------------ one job
    def process(self, job_id: str) -> str:
        with self.sessions() as session:
            job = jobs.get_job(session, job_id)
            raw_spec, result, attempt = dict(job.spec), dict(job.result or {}), job.attempts
        logger.info("Job %s: attempt %d by %s", job_id, attempt, self.owner)
        self._remove_staging_of(job_id)
        beat = _Heartbeat(self.sessions, job_id, self.owner, self.settings)
        beat.update({"attempt": attempt, "phase": "loading data"})
        beat.beat()
        beat.start()
        try:
            spec = TrainSpec.model_validate(raw_spec)
            state = self._train_all(job_id, spec, result, beat)
        except (DatasetError, ValidationError, registry.RegistryError) as exc:
            state = self._fail(job_id, f"{type(exc).__name__}: {exc}", retryable=False)
        except RanksOutOfStep as exc:
            logger.exception("Job %s failed while the ranks trained together; ending the launch", job_id)
            self._fail(job_id, f"{exc}: {exc.__cause__!r}\n{traceback.format_exc()}", retryable=True)
            raise
        except LeaseLost:
            logger.warning("Job %s: lease lost to another worker; abandoning this attempt", job_id)
            state = "lost"
        except Exception as exc:
            logger.exception("Job %s failed", job_id)
            state = self._fail(job_id, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", retryable=True)
        finally:
            beat.stop()
        logger.info("Job %s: %s", job_id, state)
        return state

    def _train_all(self, job_id: str, spec: TrainSpec, result: dict[str, Any], beat: _Heartbeat) -> str:
        from trainer.train import latest_checkpoint, load_dataset_rows, prepare, train_adapter

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
            data = prepare(spec, rows, report, target)
            beat.update(
                {"phase": f"training {name}", "adapter": name, "adapter_index": index, "adapters": len(targets)}
            )
            checkpoints = self.settings.data_dir / "checkpoints" / job_id / name
            staged = self._staging(job_id)
            resume = latest_checkpoint(checkpoints)
            if self.group is not None:
                self.group.send(
                    Order(
                        "train",
                        spec=spec,
                        data=data,
                        base_model_path=base_path,
                        checkpoint_dir=checkpoints,
                        resume=resume,
                    )
                )
            try:
                outcome = train_adapter(
                    spec,
                    data,
                    base_path,
                    staged,
                    checkpoints,
                    resume=resume,
                    progress=beat.update,
                    show_progress_bar=sys.stderr.isatty(),
                )
            except Exception as exc:
                if self.group is not None:
                    raise RanksOutOfStep(f"training {name} on rank 0 of {self.group.world_size}") from exc
                raise
            if beat.lost:
                shutil.rmtree(staged, ignore_errors=True)
                raise LeaseLost(job_id)
            traits = {target[0].value: target[1].value} if target else {c: "trained" for c in spec.conditions}
            with transaction(self.sessions) as session:
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
                        "train_tokens": outcome.train_tokens,
                        "seconds": round(outcome.seconds, 2),
                        "world_size": outcome.world_size,
                        "global_batch_size": spec.per_device_train_batch_size
                        * spec.gradient_accumulation_steps
                        * outcome.world_size,
                        "job_id": job_id,
                    },
                    dataset_hash=data.dataset_hash,
                    train_loss=outcome.train_loss,
                    eval_loss=outcome.eval_loss,
                    max_rank=self.settings.engine.max_lora_rank,
                )
                published[name] = adapter.ref
                if not jobs.record_result(session, job_id, self.owner, {"adapters": published}, beat.snapshot()):
                    raise LeaseLost(job_id)  # rolls back the registration too
            shutil.rmtree(checkpoints, ignore_errors=True)
        with transaction(self.sessions) as session:
            if not jobs.succeed(
                session, job_id, self.owner, {"adapters": published}, {**beat.snapshot(), "phase": "done"}
            ):
                raise LeaseLost(job_id)
        shutil.rmtree(self.settings.data_dir / "checkpoints" / job_id, ignore_errors=True)
        return "succeeded"

    # ------------------------------------------------------------------ helpers
    def _fail(self, job_id: str, error: str, *, retryable: bool) -> str:
        with transaction(self.sessions) as session:
            state = jobs.fail(session, job_id, self.owner, error, retryable=retryable)
        if state == "failed":
            shutil.rmtree(self.settings.data_dir / "checkpoints" / job_id, ignore_errors=True)
        self._remove_staging_of(job_id)
        return state

    def _staging(self, job_id: str) -> Path:
        self.settings.adapters_dir.mkdir(parents=True, exist_ok=True)
        path = self.settings.adapters_dir / f"{registry.STAGING_PREFIX}{job_id}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def _remove_staging_of(self, job_id: str) -> None:
        """Staging folders of this job belong to a dead attempt (we hold its lease now)."""
        if self.settings.adapters_dir.is_dir():
            for path in self.settings.adapters_dir.glob(f"{registry.STAGING_PREFIX}{job_id}-*"):
                shutil.rmtree(path, ignore_errors=True)


def submit(settings: Settings, spec: TrainSpec) -> str:
    """Queue a job; returns its id."""
    migrate.ensure_current(settings.resolved_database_url)
    sessions = session_factory(engine_for(settings))
    with transaction(sessions) as session:
        job = jobs.create_job(session, spec, max_attempts=settings.trainer.max_attempts)
        return job.id


def job_snapshot(sessions: sessionmaker[Session], job_id: str) -> TrainingJob:
    with sessions() as session:
        job = jobs.get_job(session, job_id)
        session.expunge(job)
        return job
