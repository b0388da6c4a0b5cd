"""The job queue and the registry's publish on the real databases (PostgreSQL, and SQLite where it differs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session, sessionmaker

from big5core import jobs, lease, migrate
from big5core.db import make_engine, session_factory, transaction
from big5core.models import Adapter, JobState, TrainingJob
from big5core.training import TrainSpec
from big5engine.modelstore import sha256_tree
from big5personas import registry

LEASE = 60


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database of this test's own: jobs left queued here must never reach another test's worker."""
    if request.param == "postgresql":
        url = str(request.getfixturevalue("empty_pg_url"))  # dropped after the test
    else:
        url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    migrate.upgrade(url)
    return url


@pytest.fixture()
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


def _queue(sessions: sessionmaker[Session], max_attempts: int = 3) -> str:
    with transaction(sessions) as session:
        return jobs.create_job(session, TrainSpec(max_steps=1), max_attempts=max_attempts).id


def _claim(sessions: sessionmaker[Session], owner: str, job_id: str | None = None) -> TrainingJob | None:
    with transaction(sessions) as session:
        job = jobs.claim_next(session, owner, LEASE, job_id)
        if job is not None:
            session.expunge(job)
        return job


def _expire(sessions: sessionmaker[Session], job_id: str) -> None:
    """What a dead worker leaves: its lease ran out (by the database's clock)."""
    with transaction(sessions) as session:
        session.execute(update(TrainingJob).where(TrainingJob.id == job_id).values(lease_expires_at=lease.db_now(-1)))


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite stores UTC without a zone


def test_lease_times_come_from_the_database_clock(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose clock is a day fast still leases for LEASE seconds of the database's time."""
    skewed = lambda: datetime.now(UTC) + timedelta(days=1)  # noqa: E731
    monkeypatch.setattr("big5core.jobs.utcnow", skewed, raising=False)  # what the queue used before
    monkeypatch.setattr("big5core.models.utcnow", skewed)
    job_id = _queue(sessions)
    claimed = _claim(sessions, "w1")
    assert claimed is not None and claimed.id == job_id
    with sessions() as session:
        now = _aware(lease.database_time(session))
        job = session.get(TrainingJob, job_id)
        assert job is not None and job.lease_expires_at is not None and job.heartbeat_at is not None
        remaining = (_aware(job.lease_expires_at) - now).total_seconds()
        assert LEASE - 5 < remaining <= LEASE + 1, remaining
        assert abs((_aware(job.heartbeat_at) - now).total_seconds()) < 5
    # not claimable while the lease runs, claimable once it ran out by the database's clock
    assert _claim(sessions, "w2") is None
    _expire(sessions, job_id)
    again = _claim(sessions, "w2")
    assert again is not None and again.lease_owner == "w2" and again.attempts == 2


def test_job_whose_worker_dies_on_every_attempt_ends_failed(sessions: sessionmaker[Session]) -> None:
    job_id = _queue(sessions, max_attempts=2)
    with transaction(sessions) as session:
        session.execute(
            update(TrainingJob).where(TrainingJob.id == job_id).values(checkpoint_dir="/data/checkpoints/x/attempt-1")
        )
    for attempt, owner in ((1, "w1"), (2, "w2")):
        claimed = _claim(sessions, owner)
        assert claimed is not None and claimed.attempts == attempt
        _expire(sessions, job_id)  # the worker was SIGKILLed: no heartbeat, no fail()
    assert _claim(sessions, "w3") is None  # attempts used up: reaped, not claimed a third time
    with sessions() as session:
        job = session.get(TrainingJob, job_id)
        assert job is not None
        assert (job.state, job.attempts, job.lease_expires_at) == (JobState.FAILED, 2, None)
        assert job.error and "attempt 2 of 2" in job.error and "/data/checkpoints/x" in job.error, job.error
        assert job.finished_at is not None
        assert jobs.lease_state(session, job_id, "w2") is jobs.LeaseState.LOST


def test_cancel(sessions: sessionmaker[Session]) -> None:
    queued = _queue(sessions)
    with transaction(sessions) as session:
        assert jobs.cancel(session, queued).state == JobState.CANCELLED
    running = _queue(sessions)
    assert _claim(sessions, "w1", running) is not None
    with transaction(sessions) as session:
        job = jobs.cancel(session, running)
        assert job.state == JobState.CANCELLED and job.finished_at is not None
    with transaction(sessions) as session:
        assert not jobs.heartbeat(session, running, "w1", LEASE)  # the worker's next heartbeat sees it
        assert jobs.lease_state(session, running, "w1") is jobs.LeaseState.CANCELLED
        assert not jobs.hold(session, running, "w1")  # and it cannot publish any more
        assert jobs.cancel(session, running).state == JobState.CANCELLED  # again: no-op
    assert _claim(sessions, "w2", running) is None
    done = _queue(sessions)
    assert _claim(sessions, "w1", done) is not None
    with transaction(sessions) as session:
        assert jobs.succeed(session, done, "w1", {"adapters": {}})
    with transaction(sessions) as session, pytest.raises(jobs.JobConflict, match="already succeeded"):
        jobs.cancel(session, done)
    with transaction(sessions) as session, pytest.raises(jobs.JobNotFound):
        jobs.cancel(session, "no-such-job")


# ----------------------------------------------------------------------------- concurrent publish

PUBLISHER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import numpy as np
    from safetensors.numpy import save_file
    from big5personas import registry
    from big5core.db import make_engine, session_factory, transaction

    url, adapters_dir, index, start = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    staged = registry.staging_dir(adapters_dir)
    weights = np.full((8, 16), index, dtype=np.float32)
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": weights}, str(staged / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "marker": index}
    (staged / "adapter_config.json").write_text(json.dumps(config))
    sessions = session_factory(make_engine(url))
    with sessions() as session:  # connect before the start, so all publishers race on the same instant
        session.connection()
    time.sleep(max(0.0, start - time.time()))
    with transaction(sessions) as session:
        adapter = registry.publish(
            session, staged, adapters_dir, name="racy", base_model="m", method="sft", layout="per-trait",
            traits={"openness": "high"},
        )
        version = adapter.version
        time.sleep(0.3)  # hold the transaction open: a publisher that did not wait would now collide
    print(json.dumps({"index": index, "version": version}))
    """
)


@pytest.mark.slow  # real processes started with their own interpreter
def test_concurrent_publishers_of_one_name_get_distinct_versions(db_url: str, tmp_path: Path) -> None:
    """Four processes publish the same name at once: four versions, each folder matching its sha256."""
    adapters_dir = tmp_path / "adapters"
    start = time.time() + 8  # after every interpreter has started and connected
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, db_url, str(adapters_dir), str(i), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    reported = {json.loads(out)["index"]: json.loads(out)["version"] for out, _ in outputs}
    assert sorted(reported.values()) == [1, 2, 3, 4]
    engine = make_engine(db_url)
    with session_factory(engine)() as session:
        rows = session.scalars(select(Adapter).where(Adapter.name == "racy").order_by(Adapter.version)).all()
    engine.dispose()
    assert [r.version for r in rows] == [1, 2, 3, 4]
    for row in rows:
        folder = Path(row.path)
        assert row.sha256 == sha256_tree(folder), f"{row.ref}: files do not match the registered sha256"
        marker = json.loads((folder / "adapter_config.json").read_text())["marker"]
        assert reported[marker] == row.version  # each version holds its own publisher's files
    assert sorted(p.name for p in (adapters_dir / "racy").iterdir()) == ["v1", "v2", "v3", "v4"]
    assert not list(adapters_dir.glob(".staging-*"))


# ----------------------------------------------------------------------------- compare-and-set


def test_fail_never_overwrites_a_cancel_that_lands_first(db_url: str, sessions: sessionmaker[Session]) -> None:
    """A cancel committed just before a worker's fail() stays a cancel, on SQLite as on PostgreSQL.

    The cancel runs from another connection at the instant fail() sends its UPDATE (a cursor hook on
    the worker's engine: a timing device, the statements are real). On PostgreSQL a cancel that has
    to wait for the worker's row lock is let through after fail() commits.
    """
    job_id = _queue(sessions)
    assert _claim(sessions, "w1", job_id) is not None
    worker_engine = make_engine(db_url)
    other = make_engine(db_url)
    cancelled: list[object] = []

    def cancel_from_elsewhere() -> None:
        with transaction(session_factory(other)) as session:
            cancelled.append(jobs.cancel(session, job_id).state)

    threads: list[threading.Thread] = []

    def before(conn: object, cursor: object, statement: str, *args: object) -> None:
        if not threads and statement.lstrip().upper().startswith("UPDATE TRAINING_JOBS"):
            thread = threading.Thread(target=cancel_from_elsewhere)
            threads.append(thread)
            thread.start()
            thread.join(timeout=2)  # PostgreSQL before the fix: the cancel waits for the row lock

    event.listen(worker_engine, "before_cursor_execute", before)
    try:
        with transaction(session_factory(worker_engine)) as session:
            returned = jobs.fail(session, job_id, "w1", "boom", retryable=True)
        assert threads, "fail() sent no UPDATE"
        threads[0].join(timeout=30)
    finally:
        worker_engine.dispose()
        other.dispose()
    assert cancelled == [JobState.CANCELLED]
    with sessions() as session:
        job = session.get(TrainingJob, job_id)
        assert job is not None and job.state == JobState.CANCELLED, (job and job.state, returned)
    assert returned in ("cancelled", "queued")  # queued: PostgreSQL's cancel waited for fail()'s commit


def test_fail_requeues_or_fails_by_attempts(sessions: sessionmaker[Session]) -> None:
    job_id = _queue(sessions, max_attempts=2)
    assert _claim(sessions, "w1", job_id) is not None
    with transaction(sessions) as session:
        assert jobs.fail(session, job_id, "w2", "not mine", retryable=True) == "lost"
        assert jobs.fail(session, job_id, "w1", "boom", retryable=True) == JobState.QUEUED
    assert _claim(sessions, "w1", job_id) is not None
    with transaction(sessions) as session:
        assert jobs.fail(session, job_id, "w1", "boom again", retryable=True) == JobState.FAILED
        job = session.get(TrainingJob, job_id)
        assert job is not None and job.state == JobState.FAILED and job.finished_at is not None
        assert job.error == "boom again" and job.lease_expires_at is None


# ----------------------------------------------------------------------------- durable publish


def _stage_adapter(adapters_dir: Path) -> Path:
    from safetensors.numpy import save_file

    staged = registry.staging_dir(adapters_dir)
    weights = {"base_model.model.layers.0.q_proj.lora_A.weight": np.ones((8, 16), dtype=np.float32)}
    save_file(weights, str(staged / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (staged / "adapter_config.json").write_text(json.dumps(config))
    return staged


def test_publish_fsyncs_files_then_folder_then_renames_then_fsyncs_the_parent(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the row can commit: every file, then the staged folder, rename, then the new parent.

    os.fsync is wrapped (it still runs) to record what was fsynced, by inode, and whether the final
    folder existed yet; a power cut cannot be staged in a test.
    """
    adapters_dir = tmp_path / "adapters"
    staged = _stage_adapter(adapters_dir)
    inode = {p.name: p.stat().st_ino for p in [staged, *staged.iterdir()]}
    final = adapters_dir / "durable" / "v1"
    calls: list[tuple[int, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        calls.append((os.fstat(fd).st_ino, final.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with transaction(sessions) as session:
        adapter = registry.publish(
            session, staged, adapters_dir, name="durable", base_model="m", method="sft", layout="per-trait",
            traits={"openness": "high"},
        )  # fmt: skip
        synced = list(calls)  # all before the commit
    order = [ino for ino, _ in synced]
    files = [inode[name] for name in registry.ADAPTER_FILES]
    assert all(ino in order for ino in files), synced
    folder_at = order.index(inode[staged.name])
    assert all(order.index(ino) < folder_at for ino in files), "files before their folder"
    assert not synced[folder_at][1], "the staged folder before the rename"
    parent = final.parent.stat().st_ino
    assert (parent, True) in synced[folder_at:], "the new entry's folder after the rename"
    assert (adapters_dir.stat().st_ino, True) in synced[folder_at:], "the folder the staging left"
    assert Path(adapter.path) == final.resolve() and adapter.sha256 == sha256_tree(final)
