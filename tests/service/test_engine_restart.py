"""The service outlives its engine: the engine core is SIGKILLed under load and the service recovers.

The real engine (the session's one) is served over real HTTP with uvicorn; client threads keep
generating while the test kills vLLM's engine core process. The first two restarts are made to fail
(the model folder is swapped for one without weights), so the backoff is exercised too; then the
folder is put back and the third try succeeds. Requests in flight and during the restarts get 503
``engine-not-ready`` with Retry-After, never a 500; 200s come back within a bound; the adapter loaded
before comes back and gives the same greedy reply. Giving up is tested without starting an engine:
``big5 serve`` on a base model whose engine cannot start exits with status 3.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from big5core.settings import Settings
from big5engine.engine import PersonaEngine
from big5personas.stack import Stack
from service.app import create_app
from service.errors import PROBLEM_BASE
from tests.service.conftest import with_service
from tests.service.support import generate_body, serve_over_http

pytestmark = pytest.mark.slow

RECOVERY_BOUND_S = 240  # an engine start is ~45 s on 2 cores; the kill, backoff and load add to it
CLIENTS = 6


def engine_core_processes() -> list[psutil.Process]:
    """vLLM's engine core child process(es) of this process (its title is ``VLLM::EngineCore``)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            title = " ".join(child.cmdline()) + " " + child.name()
        except psutil.Error:
            continue
        if "EngineCore" in title or "EngineCor" in child.name():
            found.append(child)
    return found


@dataclass
class Load:
    """Client threads generating in a loop; every answer is recorded as (time, status, problem type)."""

    url: str
    answers: list[tuple[float, int, str | None, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self.stop.is_set():
                response = http.post("/v1/generate", json=generate_body(method="direct", max_tokens=8))
                problem = response.json().get("type") if response.status_code != 200 else None
                self.answers.append(
                    (time.monotonic(), response.status_code, problem, response.headers.get("retry-after"))
                )
                if response.status_code != 200:
                    time.sleep(0.2)

    @classmethod
    @contextlib.contextmanager
    def running(cls, url: str) -> Iterator[Load]:
        load = cls(url)
        threads = [threading.Thread(target=load._client, daemon=True) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        try:
            yield load
        finally:
            load.stop.set()
            for thread in threads:
                thread.join(timeout=120)


def _wait(predicate, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if predicate():
            return time.monotonic() - began
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture()
def restartable(engine: PersonaEngine) -> Iterator[PersonaEngine]:
    """The session engine; if the test failed half-way, it is put back (real model path, restarted)."""
    model_path = engine.model_path
    yield engine
    engine.model_path = model_path
    if engine.dead:
        engine.restart()
    assert engine.ready


def test_killed_engine_core_is_restarted_under_load(
    service_settings: Settings,
    service_stack: Stack,
    restartable: PersonaEngine,
    published: dict[str, str],
    tmp_path: Path,
) -> None:
    engine = restartable
    lost: list[str] = []
    settings = with_service(service_settings, engine_restarts=5, engine_restart_backoff_s=1.0)
    app = create_app(settings, stack=service_stack, engine=engine, on_engine_lost=lost.append)
    adapter_body = generate_body(traits={"openness": 1}, max_tokens=16)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no architecture, no weights: a start fails at once
    with serve_over_http(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        before = http.post("/v1/generate", json=adapter_body)
        assert before.status_code == 200, before.text
        adapter = before.json()["persona"]["adapter"]
        assert adapter in engine.loras
        restarts, model_path = engine.restarts, engine.model_path

        cores = engine_core_processes()
        assert len(cores) == 1, cores
        with Load.running(url) as load:
            _wait(lambda: sum(a[1] == 200 for a in load.answers) >= CLIENTS, 120, "load to flow")
            engine.model_path = str(broken)
            killed_at = time.monotonic()
            os.kill(cores[0].pid, signal.SIGKILL)
            _wait(lambda: any(a[0] > killed_at and a[1] == 503 for a in load.answers), 60, "a 503 after the kill")
            _wait(lambda: f"restart {restarts + 2} failed" in (engine.error or ""), 120, "two failed restarts")
            health = http.get("/health")  # not ready while restarting: a 503 problem with Retry-After
            assert health.status_code == 503 and health.json()["state"] == "restarting", health.text
            assert health.json()["type"] == PROBLEM_BASE + "engine-not-ready" and int(health.headers["retry-after"]) > 0
            assert "failed" in health.json()["error"]
            assert http.get("/health", params={"live": "true"}).status_code == 200  # alive all the same
            engine.model_path = model_path  # the next try (after the backoff) succeeds
            recovered = _wait(
                lambda: engine.ready and any(a[0] > killed_at + 1 and a[1] == 200 for a in load.answers[-CLIENTS:]),
                RECOVERY_BOUND_S,
                "200s after the restart",
            )
            time.sleep(2)  # a little load on the restarted engine
        print(f"recovered {recovered:.1f} s after the kill")  # noqa: T201 - shown with pytest -s

        statuses = {a[1] for a in load.answers}
        assert statuses <= {200, 503}, sorted(statuses)  # never a 500
        refused = [a for a in load.answers if a[1] == 503]
        assert refused, "no request met the dead engine"
        assert {a[2] for a in refused} <= {PROBLEM_BASE + "engine-not-ready", PROBLEM_BASE + "server-busy"}
        assert all(a[3] is not None and int(a[3]) > 0 for a in refused)  # Retry-After on every 503
        assert engine.restarts == restarts + 3 and not lost
        assert engine_core_processes() and engine_core_processes()[0].pid != cores[0].pid

        health = http.get("/health")
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "ready" and health.json()["engine_restarts"] == engine.restarts
        assert http.get("/health", params={"ready": "true"}).status_code == 200
        assert adapter in engine.loras  # restored by the restart, not only on next use
        after = http.post("/v1/generate", json=adapter_body)
        assert after.status_code == 200, after.text
        assert after.json()["text"] == before.json()["text"]  # greedy: the same adapter really is applied


def test_serve_exits_non_zero_when_the_engine_cannot_start(tmp_path: Path) -> None:
    """Start failures are retried with backoff; then `big5 serve` stops and exits 3 for its supervisor."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIG5_")}
    env |= {
        "BIG5_DATA_DIR": str(tmp_path / "data"),
        "BIG5_BASE_MODEL": str(broken),
        "BIG5_SERVICE__ENGINE_RESTARTS": "3",
        "BIG5_SERVICE__ENGINE_RESTART_BACKOFF_S": "0.2",
    }
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "big5.cli", "serve", "--port", str(port), "--log-level", "warning"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "engine start failed 3 time(s) in a row" in done.stderr, done.stderr[-3000:]
