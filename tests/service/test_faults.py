"""Faults: the database goes away, or hangs, while assessments start and run.

The crash test never touches the machine's main cluster: a throwaway cluster is created with
postgresql-common (``pg_createcluster`` on a free port, trust authentication), stopped with
``-m immediate`` (a crash, as far as the service can tell) while the assessment runs, restarted,
and dropped afterwards. The hang test uses a fresh database on the main cluster and real locks.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from big5core.settings import Settings
from big5engine.engine import PersonaEngine
from big5personas.stack import build_stack
from service.app import create_app
from service.errors import PROBLEM_BASE
from tests.service.support import generate_body, serve_over_http

pytestmark = pytest.mark.slow

INVENTORY_ITEMS = 120  # ipip_neo_120
RUNS = 5  # ~6 s of engine time per run here: the outage lands while runs remain


def _pg_version() -> str:
    """The newest PostgreSQL server installed (postgresql-common layout)."""
    versions = sorted((p.parent.parent.name for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")), key=float)
    if not versions:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql")
    return versions[-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    version: str
    name: str
    port: int

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        command = ["pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, *args]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        self.ctl("start")

    def crash(self) -> None:
        self.ctl("stop", "-m", "immediate")

    def create_database(self) -> str:
        name = f"big5_fault_{uuid.uuid4().hex[:8]}"
        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return self.admin_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture()
def cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster of this test alone, dropped (stopped first) whatever happens."""
    if shutil.which("pg_createcluster") is None:
        pytest.skip("pg_createcluster (postgresql-common) is not installed")
    if os.geteuid() != 0:
        pytest.skip("creating a PostgreSQL cluster needs root (pg_createcluster)")
    made = Cluster(_pg_version(), f"big5fault{os.getpid()}", _free_port())
    create = ["pg_createcluster", made.version, made.name, "--port", str(made.port), "--", "--auth=trust"]
    try:
        subprocess.run(create, check=True, capture_output=True, text=True, timeout=120)
        made.start()
        yield made
    finally:
        subprocess.run(["pg_dropcluster", "--stop", made.version, made.name], capture_output=True, timeout=120)


def _state(client: TestClient, assessment_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/assessments/{assessment_id}")
    assert response.status_code == 200, response.text
    return response.json()


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def test_database_crash_fails_the_assessment_while_generation_goes_on(
    cluster: Cluster, tmp_path: Path, data_dir: Path, engine: PersonaEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="evaluator.runner")
    work = tmp_path / "data"
    work.mkdir()
    (work / "models").symlink_to(data_dir / "models", target_is_directory=True)
    settings = Settings(data_dir=work, database_url=cluster.create_database())
    stack = build_stack(settings)  # Alembic migrations, as the service's lifespan would apply them
    try:
        with TestClient(create_app(settings, stack=stack, engine=engine)) as client:
            persona = {"method": "prompt", "traits": {"openness": "high"}}
            started = client.post("/v1/assess", json={"persona": persona, "inventory": "ipip_neo_120", "runs": RUNS})
            assert started.status_code == 202, started.text
            assessment_id = started.json()["id"]
            _wait_for(lambda: _state(client, assessment_id)["state"] == "running", 60, "the assessment to run")

            cluster.crash()

            # Generation that needs no database keeps answering while the assessment runs into the outage.
            for fields in ({"method": "direct"}, {"method": "prompt", "traits": {"neuroticism": "low"}}):
                began = time.monotonic()
                answer = client.post("/v1/generate", json=generate_body(max_tokens=8, **fields))
                assert answer.status_code == 200, answer.text
                assert answer.json()["usage"]["completion_tokens"] >= 1
                assert time.monotonic() - began < 60
            # What needs the database says so: 503 + Retry-After, a problem without connection details.
            for response in (
                client.get(f"/v1/assessments/{assessment_id}"),
                client.post("/v1/generate", json=generate_body(method="sft", traits={"openness": "high"})),
            ):
                assert response.status_code == 503, response.text
                assert response.headers["content-type"].startswith("application/problem+json")
                assert response.json()["type"] == PROBLEM_BASE + "database-unavailable"
                assert int(response.headers["retry-after"]) > 0
                assert str(cluster.port) not in response.text

            def runner_hit_the_outage() -> bool:
                return any(assessment_id in r.getMessage() for r in caplog.records if r.name == "evaluator.runner")

            _wait_for(runner_hit_the_outage, 300, "the runner to meet the outage")
            assert client.post("/v1/generate", json=generate_body(method="direct", max_tokens=4)).status_code == 200

            cluster.start()

            # The stored outcome: failed with its reason and no partial answers, or (had it resumed)
            # done with every item. Never done with items missing, never left running.
            _wait_for(lambda: _state(client, assessment_id)["state"] in ("failed", "done"), 60, "a final state")
            final = _state(client, assessment_id)
            items = client.get(f"/v1/assessments/{assessment_id}/items").json()
            if final["state"] == "failed":
                assert final["error"], final
                assert final["finished_at"] is not None
                assert items == [], f"{len(items)} partial answers stored for a failed assessment"
            else:
                assert len(items) == INVENTORY_ITEMS * RUNS
                assert all(item["value"] is not None for item in items)
            assert client.post("/v1/generate", json=generate_body(method="direct", max_tokens=4)).status_code == 200
    finally:
        stack.close()


def _lock_waiters(probe: Any, database: str) -> int:
    """Backends of ``database`` waiting on a lock right now (pg_stat_activity)."""
    with probe.connect() as conn:
        query = text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND wait_event_type = 'Lock'")
        return int(conn.execute(query, {"db": database}).scalar_one())


def _generate_while_blocked(url: str) -> None:
    """Direct generation answers while an assessment waits on the database (30 s would be a stall)."""
    began = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as http:
        answer = http.post("/v1/generate", json=generate_body(method="direct", max_tokens=4))
    assert answer.status_code == 200, answer.text
    assert time.monotonic() - began < 30


def test_database_that_hangs_does_not_stall_generation(
    empty_pg_url: str, tmp_path: Path, data_dir: Path, engine: PersonaEngine
) -> None:
    """Real PostgreSQL locks make the assessment's queries hang; the event loop stays free for others."""
    work = tmp_path / "data"
    work.mkdir()
    (work / "models").symlink_to(data_dir / "models", target_is_directory=True)
    settings = Settings(data_dir=work, database_url=empty_pg_url)
    stack = build_stack(settings)
    database = empty_pg_url.rsplit("/", 1)[1]
    probe = create_engine(empty_pg_url)
    locker = create_engine(empty_pg_url).connect()
    body = {"persona": {"method": "prompt", "traits": {"openness": "high"}}, "inventory": "bfi44", "runs": 3}
    try:
        with serve_over_http(create_app(settings, stack=stack, engine=engine)) as url, ThreadPoolExecutor(1) as pool:
            # 1. The assessments table is locked: POST /assess waits inside the database.
            held = locker.begin()
            locker.execute(text("LOCK TABLE assessments IN ACCESS EXCLUSIVE MODE"))
            pending = pool.submit(httpx.post, f"{url}/v1/assess", json=body, timeout=120)
            _wait_for(
                lambda: pending.done() or _lock_waiters(probe, database) >= 1, 30, "POST /v1/assess to wait on the lock"
            )
            assert not pending.done(), pending.result().text
            _generate_while_blocked(url)
            assert not pending.done()  # still waiting: the generation really ran while it hung
            held.rollback()
            started = pending.result(timeout=60)
            assert started.status_code == 202, started.text
            assessment_id = started.json()["id"]

            # 2. The assessment's own row is locked while it runs: its progress and completion wait.
            def state() -> str:
                with probe.connect() as conn:
                    query = text("SELECT state FROM assessments WHERE id = :id")
                    return str(conn.execute(query, {"id": assessment_id}).scalar_one())

            _wait_for(lambda: state() == "running", 60, "the assessment to run")
            held = locker.begin()
            locker.execute(text("SELECT 1 FROM assessments WHERE id = :id FOR UPDATE"), {"id": assessment_id})
            _wait_for(lambda: _lock_waiters(probe, database) >= 1, 60, "the runner to wait on the row lock")
            _generate_while_blocked(url)
            held.rollback()
            _wait_for(lambda: state() == "done", 120, "the assessment to finish")
            with httpx.Client(base_url=url, timeout=30) as http:
                items = http.get(f"/v1/assessments/{assessment_id}/items").json()
            assert len(items) == 44 * 3
    finally:
        locker.close()
        probe.dispose()
        stack.close()
