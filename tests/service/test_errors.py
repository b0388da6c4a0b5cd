"""Error cases that need the real engine answer their status with an RFC 9457 problem body (never a 200).

The ones that need no engine (schema, unknown things, keys, body size, not ready) are in
test_http_errors.py, which is not slow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from big5core.db import transaction
from big5core.models import Adapter, AdapterState
from big5core.settings import Settings
from big5engine.engine import PersonaEngine
from big5personas.stack import Stack
from service.app import create_app
from tests.service.conftest import with_service
from tests.service.support import Loras, assert_problem, generate_body

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- 422


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


# ---------------------------------------------------------------- 503


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
