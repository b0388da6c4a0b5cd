"""Every error case answers its status with an RFC 9457 problem body (and never a 200)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from big5core.db import transaction
from big5core.engine import PersonaEngine
from big5core.models import Adapter, AdapterState
from big5core.settings import Settings
from big5core.stack import Stack
from service.app import create_app
from service.errors import PROBLEM_BASE
from tests.service.conftest import with_service
from tests.service.support import Loras, generate_body

pytestmark = pytest.mark.slow


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == PROBLEM_BASE + slug
    assert body["status"] == status
    assert body["title"] and body["detail"] and body["instance"]
    return body


# ---------------------------------------------------------------- 422


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (generate_body(traits={"opennes": 1}), "body.traits.opennes"),
        (generate_body(traits={"openness": 1.5}), "body.traits.openness"),
        (generate_body(temperature=-1), "body.temperature"),
        (generate_body(foo=1), "body.foo"),
        (generate_body(messages=[{"role": "user", "content": "hi"}]), "body"),  # messages AND prompt
        (generate_body(method="sarcasm"), "body.method"),
    ],
    ids=["unknown-trait", "out-of-range", "bad-temperature", "extra-field", "messages-and-prompt", "bad-method"],
)
def test_invalid_generate_bodies_are_422(client: TestClient, body: dict[str, Any], field: str) -> None:
    problem = assert_problem(client.post("/v1/generate", json=body), 422, "validation-error")
    fields = [e["field"] for e in problem["errors"]]
    assert any(f == field or f.startswith(field + ".") for f in fields), fields
    assert field.removeprefix("body.").split(".")[0] in problem["detail"] or field == "body"


def test_openai_request_validation(client: TestClient) -> None:
    base = {"model": "big5/direct", "messages": [{"role": "user", "content": "hi"}]}
    problem = assert_problem(client.post("/v1/chat/completions", json={**base, "n": 2}), 422, "validation-error")
    assert [e["field"] for e in problem["errors"]] == ["body.n"]
    assert_problem(client.post("/v1/chat/completions", json={**base, "logit_bias": {}}), 422, "validation-error")
    assert_problem(client.post("/v1/training-jobs", json={"method": "ppo"}), 422, "validation-error")


# ---------------------------------------------------------------- 400


def test_prompt_plus_max_tokens_over_the_context_is_400(client: TestClient, engine: PersonaEngine) -> None:
    body = generate_body(method="direct", prompt="hello " * 600, max_tokens=engine.max_model_len - 100)
    problem = assert_problem(client.post("/v1/generate", json=body), 400, "prompt-too-long")
    assert str(engine.max_model_len) in problem["detail"]
    chat = {
        "model": "big5/direct",
        "messages": [{"role": "user", "content": "hello " * 600}],
        "max_tokens": engine.max_model_len,
    }
    assert_problem(client.post("/v1/chat/completions", json=chat), 400, "prompt-too-long")
    too_long = {"model": "big5/direct", "messages": [{"role": "user", "content": "hello " * 2100}]}
    assert_problem(client.post("/v1/chat/completions", json=too_long), 400, "prompt-too-long")


def test_semantically_invalid_personas_are_400(client: TestClient) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    problem = assert_problem(
        client.post("/v1/chat/completions", json={**chat, "model": "gpt-4"}), 400, "invalid-persona"
    )
    assert "big5/" in problem["detail"]
    assert_problem(
        client.post("/v1/chat/completions", json={**chat, "model": "big5/sft?openness=2"}), 400, "invalid-persona"
    )
    mixed_demo = generate_body(method="demo", traits={"openness": 1, "neuroticism": -1})
    assert_problem(client.post("/v1/generate", json=mixed_demo), 400, "invalid-persona")
    direct_with_traits = generate_body(method="direct", traits={"openness": 1})
    assert_problem(client.post("/v1/generate", json=direct_with_traits), 400, "invalid-persona")


# ---------------------------------------------------------------- 404


def test_unknown_adapter_is_404(client: TestClient, published: dict[str, str]) -> None:
    problem = assert_problem(
        client.post("/v1/generate", json=generate_body(adapter="svc-missing@3")), 404, "persona-not-found"
    )
    assert "svc-missing@3" in problem["detail"]
    assert_problem(client.get("/v1/adapters/svc-missing"), 404, "adapter-not-found")


def test_persona_no_adapter_can_realise_is_404(client: TestClient, published: dict[str, str]) -> None:
    body = generate_body(traits={"openness": 1, "agreeableness": -1})  # no agreeableness-low adapter
    problem = assert_problem(client.post("/v1/generate", json=body), 404, "persona-not-found")
    assert "agreeableness=low" in problem["detail"]
    chat = {"model": "big5/dpo?openness=1", "messages": [{"role": "user", "content": "hi"}]}
    assert_problem(client.post("/v1/chat/completions", json=chat), 404, "persona-not-found")


def test_other_unknown_things_are_404(client: TestClient) -> None:
    assert_problem(client.get("/v1/assessments/0123456789abcdef"), 404, "assessment-not-found")
    assert_problem(client.get("/v1/training-jobs/0123456789abcdef"), 404, "training-job-not-found")
    assert_problem(client.get("/v1/inventories/no-such-inventory"), 404, "inventory-not-found")
    assert_problem(client.get("/v1/nothing-here"), 404, "not-found")


# ---------------------------------------------------------------- 409


def test_adapter_not_ready_is_409(client: TestClient, service_stack: Stack) -> None:
    with transaction(service_stack.sessions) as session:
        session.add(
            Adapter(
                name="svc-pending",
                version=1,
                base_model=service_stack.base_model_id,
                method="sft",
                layout="per-trait",
                traits={"openness": "high"},
                rank=8,
                path="/nowhere/svc-pending/v1",
                state=AdapterState.PENDING,
            )
        )
    problem = assert_problem(
        client.post("/v1/generate", json=generate_body(adapter="svc-pending@1")), 409, "adapter-not-ready"
    )
    assert "pending" in problem["detail"]


def test_corrupted_adapter_is_refused_with_409(client: TestClient, service_stack: Stack, loras: Loras) -> None:
    ref = loras.publish(service_stack, "svc-neuroticism-high", {"neuroticism": "high"}, 14)
    with service_stack.sessions() as session:
        folder = Path(session.query(Adapter).filter_by(name="svc-neuroticism-high").one().path)
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])  # still a valid file
    weights.write_bytes(bytes(data))

    report = client.post("/v1/adapters/reload").json()
    assert [f["ref"] for f in report["failed"]] == [ref]
    assert ref not in report["new"]
    problem = assert_problem(
        client.post("/v1/generate", json=generate_body(traits={"neuroticism": 1})),
        409,
        "adapter-checksum-mismatch",
    )
    assert ref in problem["detail"] and "sha256" in problem["detail"] and "refusing" in problem["detail"]
    assert_problem(client.post("/v1/generate", json=generate_body(adapter=ref)), 409, "adapter-checksum-mismatch")


# ---------------------------------------------------------------- 401 / 403


@pytest.fixture(scope="module")
def keyed_client(service_settings: Settings, service_stack: Stack, engine: PersonaEngine) -> Iterator[TestClient]:
    settings = with_service(service_settings, api_keys=[SecretStr("client-key")], admin_keys=[SecretStr("admin-key")])
    with TestClient(create_app(settings, stack=service_stack, engine=engine)) as test_client:
        yield test_client


def test_keys_are_required_when_configured(keyed_client: TestClient) -> None:
    body = generate_body(method="direct", max_tokens=2)
    missing = assert_problem(keyed_client.post("/v1/generate", json=body), 401, "unauthorized")
    assert "API key" in missing["detail"]
    assert keyed_client.post("/v1/generate", json=body).headers["www-authenticate"].startswith("Bearer")
    wrong = {"Authorization": "Bearer not-a-key"}
    assert_problem(keyed_client.post("/v1/generate", json=body, headers=wrong), 401, "unauthorized")
    assert_problem(keyed_client.get("/v1/adapters"), 401, "unauthorized")
    assert_problem(keyed_client.get("/v1/assessments"), 401, "unauthorized")  # the evaluator's routes too
    ok = keyed_client.post("/v1/generate", json=body, headers={"Authorization": "Bearer client-key"})
    assert ok.status_code == 200
    assert keyed_client.get("/v1/adapters", headers={"X-API-Key": "client-key"}).status_code == 200
    assert keyed_client.get("/health").status_code == 200  # operations need no key


def test_admin_routes_need_an_admin_key(keyed_client: TestClient) -> None:
    client_key = {"X-API-Key": "client-key"}
    admin_key = {"Authorization": "Bearer admin-key"}
    assert_problem(keyed_client.post("/v1/adapters/reload", headers=client_key), 403, "forbidden")
    assert_problem(keyed_client.post("/v1/training-jobs", json={}, headers=client_key), 403, "forbidden")
    assert_problem(keyed_client.post("/v1/adapters/reload"), 401, "unauthorized")
    assert keyed_client.post("/v1/adapters/reload", headers=admin_key).status_code == 200

    spec = {"method": "sft", "layout": "per-trait", "conditions": ["openness:high"], "max_steps": 2}
    created = keyed_client.post("/v1/training-jobs", json=spec, headers=admin_key)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["state"] == "queued" and created.headers["location"] == f"/v1/training-jobs/{job['id']}"
    fetched = keyed_client.get(f"/v1/training-jobs/{job['id']}", headers=admin_key).json()
    assert fetched["state"] == "queued" and fetched["attempts"] == 0 and fetched["error"] is None
    assert fetched["spec"]["conditions"] == ["openness:high"] and fetched["result"] == {}
    assert_problem(keyed_client.get(f"/v1/training-jobs/{job['id']}", headers=client_key), 403, "forbidden")


# ---------------------------------------------------------------- 503


class FakeLoadingEngine:
    """A FAKE engine that never finishes starting: the one place these tests do not use the real engine.

    It stands in for "the engine is still loading", a state the real engine passes through in ~45 s
    and that a test cannot hold it in. It implements only what the service touches before generation.
    """

    ready = False
    error = None
    start_seconds = None
    max_model_len = 2048
    loras: dict[str, Any] = {}

    def __init__(self) -> None:
        self.starting = False
        self.shutdowns = 0

    async def astart(self) -> None:
        self.starting = True
        await asyncio.Event().wait()  # until the app's lifespan cancels it

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_engine_not_ready_is_503_with_retry_after(service_settings: Settings, service_stack: Stack) -> None:
    fake = FakeLoadingEngine()
    app = create_app(service_settings, stack=service_stack, engine=fake)  # type: ignore[arg-type]
    with TestClient(app) as loading:
        health = loading.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "loading"
        assert fake.starting  # the app started it in the background
        generate = loading.post("/v1/generate", json=generate_body(method="direct"))
        assert_problem(generate, 503, "engine-not-ready")
        assert int(generate.headers["retry-after"]) > 0
        chat = {"model": "big5/direct", "messages": [{"role": "user", "content": "hi"}]}
        assert_problem(loading.post("/v1/chat/completions", json=chat), 503, "engine-not-ready")
        assess = {"persona": {"method": "direct"}, "inventory": "bfi44", "runs": 1}
        assert_problem(loading.post("/v1/assess", json=assess), 503, "engine-not-ready")
        assert loading.get("/v1/adapters").status_code == 200  # the registry view does not need the engine
    assert fake.shutdowns == 1  # the app started it, so the app shut it down


def test_queue_full_is_503_with_retry_after(
    service_settings: Settings, service_stack: Stack, engine: PersonaEngine
) -> None:
    app = create_app(with_service(service_settings, max_queue=1), stack=service_stack, engine=engine)
    body = generate_body(method="direct", max_tokens=48)

    async def scenario() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://svc", timeout=300) as http:
                return list(await asyncio.gather(*(http.post("/v1/generate", json=body) for _ in range(3))))

    responses = asyncio.run(scenario())
    assert sorted(r.status_code for r in responses) == [200, 503, 503]
    for refused in (r for r in responses if r.status_code == 503):
        assert_problem(refused, 503, "server-busy")
        assert refused.headers["retry-after"] == "1"


# ---------------------------------------------------------------- 413 and 500


def test_body_too_large_is_413(client: TestClient, service_settings: Settings) -> None:
    limit = service_settings.service.max_body_bytes
    huge = generate_body(prompt="x" * (limit + 10))
    problem = assert_problem(client.post("/v1/generate", json=huge), 413, "body-too-large")
    assert str(limit) in problem["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536

    chunked = client.post("/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert_problem(chunked, 413, "body-too-large")


def test_unexpected_errors_are_500_without_internals(
    client: TestClient, service_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("secret internal state /etc/passwd")

    monkeypatch.setattr(service_stack.resolver, "resolve", broken)
    response = client.post("/v1/generate", json=generate_body(method="direct"), headers={"X-Request-ID": "boom-1"})
    problem = assert_problem(response, 500, "internal-error")
    assert "secret" not in response.text and "passwd" not in response.text
    assert problem["request_id"] == "boom-1" and response.headers["x-request-id"] == "boom-1"


def test_no_error_is_a_200(client: TestClient) -> None:
    """Streaming requests fail before the status line when they can (a problem, not an event)."""
    body = generate_body(adapter="svc-missing@1", stream=True)
    with client.stream("POST", "/v1/generate", json=body) as response:
        response.read()
    assert_problem(response, 404, "persona-not-found")
    chat = {"model": "big5/bogus", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert_problem(client.post("/v1/chat/completions", json=chat), 400, "invalid-persona")


def test_engine_calls_time_out_with_504(
    service_settings: Settings, service_stack: Stack, engine: PersonaEngine
) -> None:
    app = create_app(with_service(service_settings, request_timeout_s=0.05), stack=service_stack, engine=engine)
    with TestClient(app) as impatient:
        body = generate_body(method="direct", max_tokens=512)
        problem = assert_problem(impatient.post("/v1/generate", json=body), 504, "generation-timeout")
        assert "request_timeout_s=0.05" in problem["detail"]
        chat = {"model": "big5/direct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 512}
        assert_problem(impatient.post("/v1/chat/completions", json=chat), 504, "generation-timeout")
        assert impatient.get("/metrics").text.count("big5_requests_in_flight 0.0") == 1  # slots came back
