"""Durability of the trainer's work: checkpoints marked complete last, leases a worker gives up on its
own, staging that only its own attempt removes, and a database connection cut mid-job on the real
PostgreSQL.

A "cut" is real: the worker connects as a role of its own; the cut makes the role NOLOGIN and
terminates its backends (``pg_terminate_backend``, from an admin connection) again and again, so
the worker's every statement and reconnect fails until the cut ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from big5core import jobs, migrate
from big5core.db import make_engine, session_factory, transaction
from big5core.lease import database_time, db_now
from big5core.models import Adapter, JobState, TrainingJob
from big5core.settings import Settings, TrainerSettings
from big5core.training import TrainSpec
from big5engine.modelstore import sha256_tree
from big5personas import registry
from tests.conftest import PG_ADMIN_URL
from tests.model_support import make_tiny_llama
from trainer import checkpoints
from trainer.checkpoints import resume_point
from trainer.lease import LeaseHeartbeat, LeaseLost, LeaseSettingsInvalid
from trainer.worker import Worker, submit

WAIT = 600.0  # generous: the CPU is shared


# ----------------------------------------------------------------------------- helpers


class Cut:
    """Cut every connection of a database role, and keep it cut, until :meth:`end`."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        self.terminated = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _terminate(self) -> int:
        with self.admin.connect() as conn:
            return len(
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE usename = :role AND pid <> pg_backend_pid()"
                    ),
                    {"role": self.role},
                ).all()
            )

    def start(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'ALTER ROLE "{self.role}" NOLOGIN'))
        self.terminated += self._terminate()

        def again() -> None:  # a connection caught in the middle of its login is cut on the next round
            while not self._stop.wait(0.2):
                self.terminated += self._terminate()

        self._thread = threading.Thread(target=again, daemon=True)
        self._thread.start()

    def end(self) -> None:
        """Let the role log in again (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self.admin.connect() as conn:
            conn.execute(text(f'ALTER ROLE "{self.role}" LOGIN'))
        self.admin.dispose()


@pytest.fixture()
def own_db(empty_pg_url: str) -> str:
    """A database of this test's own: its workers claim any claimable job, so none may come from elsewhere."""
    migrate.upgrade(empty_pg_url)
    return empty_pg_url


@pytest.fixture()
def cut_role(own_db: str) -> Iterator[tuple[str, str]]:
    """``(role, url)``: a login role of its own (superuser, no grants to keep in step) and its URL to ``own_db``."""
    role = f"big5_cut_{uuid.uuid4().hex[:8]}"
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN SUPERUSER'))
    yield role, make_url(own_db).set(username=role).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'ALTER ROLE "{role}" LOGIN'))
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :role"), {"role": role}
        )
        conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
    admin.dispose()


def _job(sessions: sessionmaker[Session], job_id: str) -> TrainingJob:
    with sessions() as session:
        job = session.get(TrainingJob, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _wait_for(what: str, condition: Callable[[], bool], timeout: float = WAIT, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f":\n{log.read_text()[-4000:]}" if log else ""))
        time.sleep(0.1)


# ----------------------------------------------------------------------------- settings


def test_heartbeat_at_or_above_the_lease_is_refused_at_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    for heartbeat in (30, 45):
        cfg = Settings(
            data_dir=tmp_path, database_url=url, trainer=TrainerSettings(lease_seconds=30, heartbeat_seconds=heartbeat)
        )
        with pytest.raises(LeaseSettingsInvalid, match="HEARTBEAT_SECONDS .* must be below .*LEASE_SECONDS"):
            Worker(cfg)
    Worker(
        Settings(data_dir=tmp_path, database_url=url, trainer=TrainerSettings(lease_seconds=30, heartbeat_seconds=10))
    )


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint(folder: Path, step: int, *, complete: bool) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    if complete:
        checkpoints.mark_complete(path, step)
    return path


def test_resume_skips_a_checkpoint_cut_short_for_the_newest_complete_one(tmp_path: Path) -> None:
    """trainer_state.json alone does not make a checkpoint: only its marker, written last, does."""
    root = tmp_path / "job"
    first = root / "attempt-1" / "sft-openness-high"
    complete = _checkpoint(first, 4, complete=True)
    _checkpoint(first, 6, complete=False)  # killed after trainer_state.json, before the marker
    assert resume_point(root, "sft-openness-high", 2) == complete
    second = root / "attempt-2" / "sft-openness-high"
    _checkpoint(second, 8, complete=False)  # the newest attempt got no checkpoint to the end
    assert resume_point(root, "sft-openness-high", 3) == complete
    newer = _checkpoint(second, 7, complete=True)
    assert resume_point(root, "sft-openness-high", 3) == newer
    assert resume_point(root, "sft-openness-high", 1) is None
    assert json.loads((newer / checkpoints.MARKER).read_text()) == {"step": 7}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", bundled_model_path)


FAST = dict(
    method="sft",
    layout="per-trait",
    per_device_train_batch_size=2,
    max_length=96,
    warmup_steps=0,
    learning_rate=1e-3,
    save_steps=1,
    eval=False,
)


@pytest.mark.slow  # trains
def test_trainer_marks_each_checkpoint_last_and_resumes_past_one_cut_short(tiny_model: Path, tmp_path: Path) -> None:
    from trainer.train import load_dataset_rows, prepare, train_adapter

    spec = TrainSpec(conditions=["openness:high"], max_steps=3, **FAST)
    rows, report = load_dataset_rows(spec)
    data = prepare(spec, rows, report, spec.targets()[0])
    folder = tmp_path / "ckpt"
    train_adapter(spec, data, str(tiny_model), None, folder, show_progress_bar=False)
    saved = sorted(folder.glob("checkpoint-*"))
    assert [p.name for p in saved] == ["checkpoint-2", "checkpoint-3"]  # save_total_limit=2
    for checkpoint in saved:
        marker = checkpoint / checkpoints.MARKER
        assert marker.is_file(), f"{checkpoint.name} has no completion marker"
        newest_other = max(p.stat().st_mtime_ns for p in checkpoint.rglob("*") if p.is_file() and p != marker)
        assert marker.stat().st_mtime_ns >= newest_other, "the marker is written last"

    newest = folder / "checkpoint-3"  # now cut it short: a worker killed while the Trainer wrote it
    (newest / checkpoints.MARKER).unlink()
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    seen: dict[str, object] = {}
    longer = spec.model_copy(update={"max_steps": 4})
    result = train_adapter(longer, data, str(tiny_model), None, folder, progress=seen.update, show_progress_bar=False)
    assert seen["resumed_from_step"] == 2 and result.steps == 4


# ----------------------------------------------------------------------------- the lease


def test_worker_that_cannot_renew_its_lease_stops_before_it_expires(own_db: str, cut_role: tuple[str, str]) -> None:
    role, role_url = cut_role
    admin = make_engine(own_db)
    sessions = session_factory(admin)
    with transaction(sessions) as session:
        job_id = jobs.create_job(session, TrainSpec(max_steps=1)).id
    lease = 4
    cfg = Settings(database_url=role_url, trainer=TrainerSettings(lease_seconds=lease, heartbeat_seconds=1))
    leased_at = time.monotonic()
    with transaction(sessions) as session:
        assert jobs.claim_next(session, "w1", lease, job_id) is not None
    worker_engine = make_engine(role_url)
    beat = LeaseHeartbeat(session_factory(worker_engine), job_id, "w1", cfg, leased_at)
    beat.start()
    cut = Cut(role)
    try:
        time.sleep(2 * lease)  # renewals succeed: no reason to stop
        assert beat.stop_reason() is None and beat.is_alive()
        beat.check()
        cut.start()
        _wait_for("the worker to give the lease up", lambda: beat.stop_reason() is not None, timeout=3 * lease)
        with sessions() as session:  # before the database lets anyone else claim the job
            assert database_time(session) < _job(sessions, job_id).lease_expires_at
            assert jobs.claim_next(session, "w2", lease, job_id) is None
            session.rollback()
        assert "could not be renewed" in str(beat.stop_reason())
        with pytest.raises(LeaseLost):
            beat.check()
        assert cut.terminated >= 1
    finally:
        cut.end()
    renewed = _job(sessions, job_id).heartbeat_at
    time.sleep(2.5)  # the database is back: a worker that gave the lease up renews it no more
    assert _job(sessions, job_id).heartbeat_at == renewed and not beat.is_alive()
    beat.stop()
    worker_engine.dispose()
    admin.dispose()


def _bogus_model(folder: Path) -> Path:
    """A base model folder the trainer fails to load (after the staging folder exists)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    return folder


def test_a_failure_removes_only_its_own_attempts_staging(settings: Settings, own_db: str, tmp_path: Path) -> None:
    """A worker fails after another one took its job over: the new owner's staging folder survives."""
    cfg = settings.model_copy(
        update={
            "base_model": str(_bogus_model(tmp_path / "bogus")),
            "database_url": own_db,
            "trainer": TrainerSettings(lease_seconds=30, heartbeat_seconds=10),
        }
    )
    job_id = submit(cfg, TrainSpec(conditions=["openness:high"], max_steps=2, **FAST))
    old = Worker(cfg, owner="w1")
    thief: dict[str, Path] = {}

    def take_over(conn: object, cursor: object, statement: str, *args: object) -> None:
        """The instant w1 next touches the job after staging: w2 holds it now and stages its own adapter."""
        staged = list(cfg.adapters_dir.glob(f"{registry.STAGING_PREFIX}{job_id}-a1-*"))
        if thief or not staged or "training_jobs" not in statement:
            return
        with transaction(session_factory(other)) as session:
            session.execute(
                update(TrainingJob)
                .where(TrainingJob.id == job_id)
                .values(lease_owner="w2", attempts=TrainingJob.attempts + 1, lease_expires_at=db_now(600))
            )
        thief["own"] = staged[0]
        thief["staging"] = cfg.adapters_dir / f"{registry.STAGING_PREFIX}{job_id}-a2-0123abcd"
        thief["staging"].mkdir()
        (thief["staging"] / "adapter_model.safetensors").write_bytes(b"being written by w2")

    other = make_engine(own_db)
    event.listen(old.engine, "before_cursor_execute", take_over)
    try:
        assert old.run(once=True) == 1
    finally:
        event.remove(old.engine, "before_cursor_execute", take_over)
    assert thief, "w1 never got as far as staging"
    job = _job(session_factory(other), job_id)
    assert (job.state, job.lease_owner, job.attempts) == (JobState.RUNNING, "w2", 2), job.error
    assert not thief["own"].exists()
    assert (thief["staging"] / "adapter_model.safetensors").read_bytes() == b"being written by w2"
    other.dispose()


# ----------------------------------------------------------------------------- the fault test


def _start_worker(cfg: Settings, database_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "BIG5_DATA_DIR": str(cfg.data_dir),
        "BIG5_DATABASE_URL": database_url,
        "BIG5_BASE_MODEL": str(cfg.base_model),
        "BIG5_TRAINER__LEASE_SECONDS": str(cfg.trainer.lease_seconds),
        "BIG5_TRAINER__HEARTBEAT_SECONDS": str(cfg.trainer.heartbeat_seconds),
        "BIG5_TRAINER__POLL_SECONDS": str(cfg.trainer.poll_seconds),
    }
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "big5.cli", "worker", "--once"], env=env, stdout=out, stderr=out)


def alive(proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        pytest.fail(f"worker exited ({proc.returncode}) too early:\n{log.read_text()[-4000:]}")
    return True


def _newest_complete_step(folder: Path) -> int:
    found = checkpoints.complete_checkpoints(folder)
    return found[-1][0] if found else 0


@pytest.mark.slow  # trains, two worker processes
def test_connection_cut_longer_than_the_lease_mid_job_publishes_one_version(
    settings: Settings, tiny_model: Path, own_db: str, cut_role: tuple[str, str], tmp_path: Path
) -> None:
    """Worker A's connection is cut mid-job for longer than the lease while worker B takes the job over.

    A stops on its own before its lease expires (no checkpoint after B resumes, nothing published);
    B resumes from A's newest complete checkpoint and publishes: exactly one version, whose files
    match the registry's sha256, and nothing of A's attempt is left (no staging, no checkpoints).
    """
    role, role_url = cut_role
    lease = 6
    cfg = settings.model_copy(
        update={
            "base_model": str(tiny_model),
            "database_url": own_db,
            "trainer": TrainerSettings(lease_seconds=lease, heartbeat_seconds=1, poll_seconds=0.2),
        }
    )
    name = "sft-openness-high"
    job_id = submit(cfg, TrainSpec(conditions=["openness:high"], max_steps=40, **FAST))
    engine: Engine = make_engine(own_db)
    sessions = session_factory(engine)
    attempt_1 = cfg.data_dir / "checkpoints" / job_id / "attempt-1" / name
    log_a, log_b = tmp_path / "worker-a.log", tmp_path / "worker-b.log"
    a = _start_worker(cfg, role_url, log_a)
    b: subprocess.Popen[bytes] | None = None
    cut = Cut(role)
    try:
        _wait_for("A's third checkpoint", lambda: alive(a, log_a) and _newest_complete_step(attempt_1) >= 3, log=log_a)
        cut.start()
        cut_at = time.monotonic()

        def expired() -> bool:
            with sessions() as session:
                expires = _job(sessions, job_id).lease_expires_at
                return expires is not None and expires < database_time(session)

        a_done: dict[str, float | int] = {}

        def watch_a() -> bool:
            if "at" not in a_done and a.poll() is not None:
                a_done.update(at=time.monotonic(), newest=_newest_complete_step(attempt_1))
            return True

        _wait_for("A's lease to expire", lambda: watch_a() and expired(), timeout=60, log=log_a)
        b = _start_worker(cfg, own_db, log_b)
        _wait_for(
            "B to take the job over, the cut to outlast the lease",
            lambda: (
                watch_a()
                and (b is None or alive(b, log_b))
                and _job(sessions, job_id).attempts == 2
                and time.monotonic() - cut_at > 2 * lease
            ),
            log=log_b,
        )
        _wait_for("A to have stopped on its own", lambda: watch_a() and "at" in a_done, timeout=30, log=log_a)
        cut.end()
        cut_ended = time.monotonic()
        b.wait(timeout=WAIT)
    finally:
        cut.end()
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
    text_a, text_b = log_a.read_text(), log_b.read_text()
    assert a.returncode == 0, text_a[-4000:]
    assert b.returncode == 0, text_b[-4000:]
    assert cut.terminated >= 1, "the cut never hit a connection of A"
    assert float(a_done["at"]) < cut_ended, "A stopped only once the database was back"
    assert "could not be renewed" in text_a and f"{name} stopped at step" in text_a, text_a[-4000:]

    job = _job(sessions, job_id)
    assert (job.state, job.attempts) == (JobState.SUCCEEDED, 2), job.error
    assert job.progress["resumed_from_step"] == a_done["newest"], (job.progress, a_done)  # A wrote nothing later
    with sessions() as session:
        published = list(session.scalars(select(Adapter).where(Adapter.name == name)))
        assert [(p.version, p.hyperparams["attempt"], p.hyperparams["steps"]) for p in published] == [(1, 2, 40)]
        registry.verify(published[0])
    assert published[0].sha256 == sha256_tree(Path(published[0].path))
    assert [p.name for p in (cfg.adapters_dir / name).iterdir()] == ["v1"]
    assert not list(cfg.adapters_dir.glob(f"{registry.STAGING_PREFIX}*"))
    assert not (cfg.data_dir / "checkpoints" / job_id).exists()
    engine.dispose()
