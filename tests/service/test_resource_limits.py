"""Bounded resources on the real engine (issue 28): composed folders are released on every path, so the
cache limit holds under failing requests; the disk budget refuses with 503; reasoning runs are admitted
like assessments and can be cancelled. One app on the session's engine for all of it (~45 s start)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from big5core.settings import Settings
from big5engine.compose_cache import COMPOSED_PREFIX, ComposedCache
from big5engine.engine import PersonaEngine
from big5personas.stack import Stack
from service.app import create_app
from tests.service.conftest import with_service
from tests.service.support import assert_problem, generate_body

pytestmark = pytest.mark.slow  # the real engine

VECTORS = [(o, e) for o in (0.25, 0.5, 0.75) for e in (-0.25, -0.5)]  # six distinct compositions


def _composed(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob(f"{COMPOSED_PREFIX}*"))


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture()
def limited(
    service_settings: Settings, service_stack: Stack, engine: PersonaEngine, published: dict[str, str]
) -> Iterator[TestClient]:
    settings = with_service(service_settings, composed_cache_size=2, max_reasoning_runs=1)
    with TestClient(create_app(settings, stack=service_stack, engine=engine)) as client:
        yield client


def test_failing_requests_release_their_folders_and_runs_are_bounded(
    limited: TestClient, engine: PersonaEngine
) -> None:
    state = limited.app.state.service  # type: ignore[attr-defined]
    cache: ComposedCache = state.stack.resolver._cache
    root = cache.root
    # 1. Over-long prompts, each with a trait vector of its own: every one composes, then fails with 400.
    for openness, extraversion in VECTORS:
        body = generate_body(
            traits={"openness": openness, "extraversion": extraversion},
            prompt="hello " * 600,
            max_tokens=engine.max_model_len - 100,
        )
        assert_problem(limited.post("/v1/generate", json=body), 400, "prompt-too-long")
        assert cache.held() == []  # released although the request failed after resolve
        assert len(_composed(root)) <= cache.budget  # so the limit holds
    assert cache.usage()[0] <= cache.budget

    # 2. An assessment of a composed persona releases its folder when it ends.
    persona = {"method": "sft", "traits": {"openness": 0.5, "extraversion": -0.5}}
    accepted = limited.post("/v1/assess", json={"persona": persona, "inventory": "bfi44", "runs": 1})
    assert accepted.status_code == 202, accepted.text
    assessment = accepted.json()["id"]
    _wait(lambda: limited.get(f"/v1/assessments/{assessment}").json()["state"] in ("done", "failed"), 600, "assess")
    assert limited.get(f"/v1/assessments/{assessment}").json()["state"] == "done"
    assert cache.held() == []

    # 3. Reasoning: max_reasoning_runs=1 admits one run; a second is 503; cancel stops the first.
    run_body = {"personas": ["big5/sft?openness=0.75&extraversion=-0.25"], "tasks": ["arc_easy"], "limit": 400}
    first = limited.post("/v1/reasoning", json=run_body)
    assert first.status_code == 202, first.text
    run_id = first.json()["id"]
    busy = assert_problem(limited.post("/v1/reasoning", json=run_body), 503, "server-busy")
    assert "reasoning runs" in busy["detail"]
    _wait(lambda: limited.get(f"/v1/reasoning/{run_id}").json()["state"] == "running", 300, "the run to start")
    _wait(lambda: bool(cache.held()), 300, "the run to hold its composed adapter")
    began = time.monotonic()
    cancelled = limited.post(f"/v1/reasoning/{run_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "failed" and cancelled.json()["error"] == "cancelled by a client"
    _wait(lambda: not state.reasoning.running(run_id), 120, "the cancelled run to stop")
    stopped = time.monotonic() - began
    print(f"cancelled run stopped {stopped:.1f} s after the cancel")  # noqa: T201 - shown with pytest -s
    assert cache.held() == []  # its composed folder is released
    assert limited.post(f"/v1/reasoning/{run_id}/cancel").status_code == 200  # again: no change
    again = limited.post("/v1/reasoning", json=run_body)  # the slot is free again
    assert again.status_code == 202, again.text
    assert limited.post(f"/v1/reasoning/{again.json()['id']}/cancel").status_code == 200
    _wait(lambda: not state.reasoning.running(again.json()["id"]), 120, "the second run to stop")
    assert cache.held() == []

    # 4. The disk budget: with no room, a new vector is a 503 problem and nothing of it is written.
    before = _composed(root)
    budget, cache.max_bytes = cache.max_bytes, 1  # the session's stack: put back below
    try:
        # a vector no other test of the session composes (values snap to the 0.25 grid; the steps above and
        # test_composed_residency compose openness 0.25..0.75 with extraversion -1..-0.25)
        body = generate_body(traits={"openness": 1.0, "extraversion": -0.75}, max_tokens=1)
        refused = assert_problem(limited.post("/v1/generate", json=body), 503, "composed-storage-full")
        assert int(limited.post("/v1/generate", json=body).headers["retry-after"]) > 0
    finally:
        cache.max_bytes = budget
    assert str(root) not in refused["detail"]
    assert set(_composed(root)) <= set(before)  # idle ones may have been evicted to make room; none added
    assert not list(root.glob(".compose-*")) and not list((root / ".reservations").iterdir())
    assert cache.held() == []
