"""The worker's own heartbeat file and ``big5 worker --check-health``, the worker containers' healthcheck.

Real workers on a PostgreSQL database of the test's own (a worker claims any claimable job).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from big5core import jobs, migrate
from big5core.db import transaction
from big5core.models import TrainingJob
from big5core.settings import Settings, TrainerSettings
from big5core.training import TrainSpec
from trainer.lease import LeaseHeartbeat
from trainer.liveness import Liveness, check
from trainer.worker import Worker


@pytest.fixture()
def own_db(empty_pg_url: str) -> str:
    migrate.upgrade(empty_pg_url)
    return empty_pg_url


def _record(path: Path) -> dict[str, object]:
    return json.loads(path.read_text())


def test_check_reads_the_age_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "alive"
    assert not check(path, 60).healthy and "no liveness file" in check(path, 60).message
    Liveness(path, "host:1:abc").touch()
    at = float(_record(path)["at"])  # type: ignore[arg-type]
    assert check(path, 60, now=at + 59).healthy
    late = check(path, 60, now=at + 61)
    assert not late.healthy and "host:1:abc" in late.message and "61 s ago" in late.message
    path.write_text("{")
    assert not check(path, 60).healthy


def test_worker_rewrites_the_file_when_it_polls_and_when_it_renews_a_lease(own_db: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=own_db, trainer=TrainerSettings(poll_seconds=0.1))
    worker = Worker(settings)
    path = tmp_path / "alive"
    worker.liveness = Liveness(path, worker.owner)
    assert worker.run(exit_when_idle=True) == 0
    assert _record(path)["owner"] == worker.owner and _record(path)["job"] is None  # idle
    with transaction(worker.sessions) as session:
        job = jobs.create_job(session, TrainSpec(max_steps=1))
        job.spec = {**job.spec, "method": "no-such-method"}  # fails validation right after the first renewal
        job_id = job.id
    assert worker.run(once=True) == 1
    assert _record(path)["job"] == job_id  # written by the job's heartbeat, after claiming it
    with worker.sessions() as session:
        assert session.get(TrainingJob, job_id).state == "failed"  # type: ignore[union-attr]

    # a renewal that fails (the lease is someone else's) does not count as alive
    path.unlink()
    with transaction(worker.sessions) as session:
        other = jobs.create_job(session, TrainSpec(max_steps=1)).id
    with transaction(worker.sessions) as session:
        assert jobs.claim_next(session, "another-worker", 60, other) is not None
    beat = LeaseHeartbeat(worker.sessions, other, worker.owner, settings)
    beat.on_renewed = lambda: worker.liveness.touch(other)  # type: ignore[union-attr]
    beat.beat()
    assert not path.exists() and beat.lost
    mine = LeaseHeartbeat(worker.sessions, other, "another-worker", settings)
    mine.on_renewed = lambda: worker.liveness.touch(other)  # type: ignore[union-attr]
    mine.beat()
    assert _record(path)["job"] == other
    worker.engine.dispose()


def _big5(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "big5.cli", "worker", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_check_health_follows_a_running_worker(own_db: str, tmp_path: Path) -> None:
    """What the compose healthcheck runs: healthy while the worker polls, unhealthy once it stops for a lease."""
    path = tmp_path / "alive"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BIG5_")},
        "BIG5_DATA_DIR": str(tmp_path / "data"),
        "BIG5_DATABASE_URL": own_db,
        "BIG5_TRAINER__LEASE_SECONDS": "3",
        "BIG5_TRAINER__HEARTBEAT_SECONDS": "1",
        "BIG5_TRAINER__POLL_SECONDS": "0.2",
    }
    assert _big5("--check-health", "--liveness-file", str(path), env=env).returncode == 1  # no worker yet
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "big5.cli", "worker", "--liveness-file", str(path)], env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 120
        while not path.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        healthy = _big5("--check-health", "--liveness-file", str(path), env=env)
        assert healthy.returncode == 0, healthy.stderr
        assert "healthy" in healthy.stdout and "idle" in healthy.stdout
        proc.send_signal(signal.SIGSTOP)  # a hung worker: alive as a process, doing nothing
        try:
            time.sleep(3.5)
            stale = _big5("--check-health", "--liveness-file", str(path), env=env)
        finally:
            proc.send_signal(signal.SIGCONT)
        assert stale.returncode == 1 and "unhealthy" in stale.stderr, (stale.stdout, stale.stderr)
        deadline = time.monotonic() + 30
        while _big5("--check-health", "--liveness-file", str(path), env=env).returncode != 0:
            assert time.monotonic() < deadline, log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    missing = _big5("--check-health", env=env)
    assert missing.returncode == 2 and "--liveness-file" in missing.stderr
