"""The queue under real failures: worker processes SIGKILLed, leases stolen, jobs cancelled mid-training.

Real worker processes (``big5 worker``) train a tiny random Llama against the real PostgreSQL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from big5core import lease, migrate
from big5core.db import make_engine, session_factory, transaction
from big5core.models import Adapter, JobState, TrainingJob
from big5core.settings import Settings, TrainerSettings
from big5core.training import TrainSpec
from tests.model_support import make_tiny_llama
from trainer.worker import Worker, submit

pytestmark = pytest.mark.slow

LONG = dict(  # never finishes within a test: every job here is stopped or killed
    method="sft",
    layout="per-trait",
    max_steps=5000,
    per_device_train_batch_size=2,
    max_length=128,
    warmup_steps=0,
    learning_rate=1e-3,
    save_steps=1,
    eval=False,
)
WAIT = 900.0  # generous: the CPU is shared


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", bundled_model_path)


@pytest.fixture()
def own_db(empty_pg_url: str) -> str:
    """A database of this test's own: its workers claim any claimable job, so none may come from elsewhere."""
    migrate.upgrade(empty_pg_url)
    return empty_pg_url


def _config(settings: Settings, tiny_model: Path, database_url: str, max_attempts: int = 3) -> Settings:
    # a worker gives up a lease it could not renew for (lease + heartbeat) / 2 s: 3.5 s here, room for a loaded CPU
    trainer = TrainerSettings(lease_seconds=6, heartbeat_seconds=1, poll_seconds=0.2, max_attempts=max_attempts)
    return settings.model_copy(update={"base_model": str(tiny_model), "trainer": trainer, "database_url": database_url})


def _start_worker(cfg: Settings, *args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",  # the log shows what a SIGKILLed worker did last
        "BIG5_DATA_DIR": str(cfg.data_dir),
        "BIG5_DATABASE_URL": str(cfg.database_url),
        "BIG5_BASE_MODEL": str(cfg.base_model),
        "BIG5_TRAINER__LEASE_SECONDS": str(cfg.trainer.lease_seconds),
        "BIG5_TRAINER__HEARTBEAT_SECONDS": str(cfg.trainer.heartbeat_seconds),
        "BIG5_TRAINER__POLL_SECONDS": str(cfg.trainer.poll_seconds),
        "BIG5_TRAINER__MAX_ATTEMPTS": str(cfg.trainer.max_attempts),
    }
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "big5.cli", "worker", *args], env=env, stdout=out, stderr=out)


def _wait_for(what: str, condition: Callable[[], bool], proc: subprocess.Popen[bytes] | None, log: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"worker exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def _job(sessions: sessionmaker[Session], job_id: str) -> TrainingJob:
    with sessions() as session:
        job = session.get(TrainingJob, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _complete_checkpoint(folder: Path) -> bool:
    return any((c / "trainer_state.json").is_file() for c in folder.glob("checkpoint-*"))


def _adapters_of(sessions: sessionmaker[Session], job_id: str) -> list[Adapter]:
    with sessions() as session:
        return list(session.scalars(select(Adapter).where(Adapter.hyperparams["job_id"].as_string() == job_id)))


def _lease_expired(sessions: sessionmaker[Session], job_id: str) -> bool:
    with sessions() as session:
        expires = _job(sessions, job_id).lease_expires_at
        return expires is not None and expires < lease.database_time(session)


def test_job_killed_on_every_attempt_ends_failed(
    settings: Settings, tiny_model: Path, own_db: str, tmp_path: Path
) -> None:
    """SIGKILL the worker on each of max_attempts attempts: the job ends failed, never claimed again."""
    cfg = _config(settings, tiny_model, own_db, max_attempts=2)
    job_id = submit(cfg, TrainSpec(conditions=["openness:high"], **LONG))
    engine = make_engine(str(cfg.database_url))
    sessions = session_factory(engine)
    root = cfg.data_dir / "checkpoints" / job_id
    log = tmp_path / "workers.log"
    for attempt in (1, 2):
        if attempt > 1:
            _wait_for("the dead worker's lease to expire", lambda: _lease_expired(sessions, job_id), None, log)
        proc = _start_worker(cfg, "--once", log=log)
        try:
            folder = root / f"attempt-{attempt}" / "sft-openness-high"
            checkpointed = lambda folder=folder: _complete_checkpoint(folder)  # noqa: E731
            beaten = lambda attempt=attempt: _job(sessions, job_id).progress.get("attempt") == attempt  # noqa: E731
            _wait_for(f"a checkpoint of attempt {attempt}", checkpointed, proc, log)
            _wait_for("the attempt's progress", beaten, proc, log)  # heartbeat recorded where it resumed from
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        job = _job(sessions, job_id)
        assert (job.state, job.attempts) == (JobState.RUNNING, attempt)
        assert job.checkpoint_dir == str(root / f"attempt-{attempt}")
        if attempt == 2:  # resumed explicitly from the newest complete checkpoint of attempt 1
            assert str(root / "attempt-1" / "sft-openness-high" / "checkpoint-") in job.progress["resumed_from"]

    _wait_for("the last lease to expire", lambda: _lease_expired(sessions, job_id), None, log)
    assert Worker(cfg).run(once=True) == 0  # reaped, not claimed a third time
    job = _job(sessions, job_id)
    assert (job.state, job.attempts) == (JobState.FAILED, 2), job.error
    assert job.error and "attempt 2 of 2" in job.error and str(root / "attempt-2") in job.error
    assert _adapters_of(sessions, job_id) == []
    for attempt in (1, 2):  # kept for inspection
        assert _complete_checkpoint(root / f"attempt-{attempt}" / "sft-openness-high")
    assert not list(cfg.adapters_dir.glob(f".staging-{job_id}-*"))
    engine.dispose()


def _stop_steps(log: str, job_id: str) -> tuple[int, int]:
    """(step at which the heartbeat noticed, step at which training stopped) for ``job_id``."""
    noticed = re.search(rf"Job {job_id}: .* \(noticed at step (\d+)\)", log)
    assert noticed, log[-4000:]
    stopped = re.search(rf"Job {job_id}: \S+ stopped at step (\d+)", log)
    assert stopped, log[-4000:]
    return int(noticed.group(1)), int(stopped.group(1))


def test_stolen_lease_and_cancel_stop_training_within_a_step(
    settings: Settings, tiny_model: Path, own_db: str, tmp_path: Path
) -> None:
    """One worker process: its first job's lease is stolen, its second job is cancelled (`big5 jobs cancel`).

    Each stops within one step of the heartbeat noticing, publishes nothing, leaves no staging folder.
    """
    cfg = _config(settings, tiny_model, own_db)
    stolen = submit(cfg, TrainSpec(conditions=["openness:low"], name="stolen", **LONG))
    cancelled = submit(cfg, TrainSpec(conditions=["openness:low"], name="cancelled", **LONG))
    engine = make_engine(str(cfg.database_url))
    sessions = session_factory(engine)
    log = tmp_path / "worker.log"
    proc = _start_worker(cfg, "--exit-when-idle", log=log)
    try:
        _wait_for("training of the first job", lambda: _job(sessions, stolen).progress.get("step", 0) >= 2, proc, log)
        with transaction(sessions) as session:  # another worker takes the job over
            session.execute(
                update(TrainingJob)
                .where(TrainingJob.id == stolen)
                .values(lease_owner="thief", lease_expires_at=lease.db_now(600), progress={"owner": "thief"})
            )
        step = lambda: _job(sessions, cancelled).progress.get("step", 0)  # noqa: E731
        _wait_for("training of the second job", lambda: step() >= 2, proc, log)
        cli = subprocess.run(
            [sys.executable, "-m", "big5.cli", "jobs", "cancel", cancelled],
            env={**os.environ, "BIG5_DATA_DIR": str(cfg.data_dir), "BIG5_DATABASE_URL": str(cfg.database_url)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0 and f"{cancelled}  cancelled" in cli.stdout, cli.stderr[-3000:]
        proc.wait(timeout=WAIT)  # nothing left to claim: the thief holds the first job
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]

    noticed, stopped = _stop_steps(text, stolen)
    assert noticed <= stopped <= noticed + 1, (noticed, stopped)
    job = _job(sessions, stolen)  # the old owner wrote nothing after losing the lease
    assert (job.state, job.lease_owner, job.attempts, job.progress) == ("running", "thief", 1, {"owner": "thief"})
    assert _complete_checkpoint(cfg.data_dir / "checkpoints" / stolen / "attempt-1" / "stolen-openness-low")

    noticed, stopped = _stop_steps(text, cancelled)
    assert noticed <= stopped <= noticed + 1, (noticed, stopped)
    job = _job(sessions, cancelled)
    assert job.state == JobState.CANCELLED and job.finished_at is not None
    assert not (cfg.data_dir / "checkpoints" / cancelled).exists()

    for job_id in (stolen, cancelled):
        assert _adapters_of(sessions, job_id) == []
        assert not list(cfg.adapters_dir.glob(f".staging-{job_id}-*"))
    assert not (cfg.adapters_dir / "stolen-openness-low").exists()
    assert not (cfg.adapters_dir / "cancelled-openness-low").exists()
    engine.dispose()
