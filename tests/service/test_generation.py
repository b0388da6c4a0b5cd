"""Generation through the HTTP service on the real engine: batching, streaming, composition, reload."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from big5core.settings import Settings
from big5engine.engine import PersonaEngine
from big5personas.stack import Stack
from service.app import create_app
from tests.service.conftest import with_service
from tests.service.support import QUESTION, Loras, generate_body, sse_from_text

pytestmark = pytest.mark.slow


def _generate(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/generate", json=generate_body(**fields))
    assert response.status_code == 200, response.text
    return response.json()


def test_health_is_ready(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"
    assert response.json()["base_model"] == "bundled:smollm2-135m-instruct"


def test_personas_in_one_batch_equal_each_alone(
    service_settings: Settings, service_stack: Stack, engine: PersonaEngine, published: dict[str, str]
) -> None:
    """Adapter, adapter, prompt and no-adapter personas decoded together give what each gives alone."""
    personas = {
        "openness": generate_body(traits={"openness": 1}),
        "extraversion": generate_body(traits={"extraversion": -1}),
        "direct": generate_body(method="direct"),
        "prompt": generate_body(method="prompt", traits={"openness": 1}),
    }
    order = ["openness", "direct", "extraversion", "prompt", "direct", "openness", "extraversion", "direct"]
    app = create_app(service_settings, stack=service_stack, engine=engine)

    async def scenario() -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://svc", timeout=300) as http:
                alone = {}
                for name, body in personas.items():
                    response = await http.post("/v1/generate", json=body)
                    assert response.status_code == 200, response.text
                    alone[name] = response.json()
                batched = await asyncio.gather(*(http.post("/v1/generate", json=personas[n]) for n in order))
                assert all(r.status_code == 200 for r in batched), [r.text for r in batched]
                return alone, [r.json() for r in batched]

    alone, batched = asyncio.run(scenario())
    texts = {name: result["text"] for name, result in alone.items()}
    assert all(text.strip() for text in texts.values())
    # the personas really differ: each adapter changes the reply, and the two adapters differ
    assert texts["openness"] != texts["direct"]
    assert texts["extraversion"] != texts["direct"]
    assert texts["openness"] != texts["extraversion"]
    assert texts["prompt"] != texts["direct"]
    assert alone["openness"]["persona"]["adapter"] == published["openness"]
    assert alone["extraversion"]["persona"]["adapter"] == published["extraversion"]
    assert alone["direct"]["persona"]["adapter"] is None and alone["direct"]["persona"]["prefix"] is None
    assert alone["prompt"]["persona"]["adapter"] is None
    assert alone["prompt"]["persona"]["prefix"] == "You are a person with high openness."
    # ... and batching does not mix them up (the no-adapter requests included)
    for name, result in zip(order, batched, strict=True):
        assert result["text"] == texts[name], f"{name} changed when batched with other personas"
        assert result["persona"] == alone[name]["persona"]
        assert result["usage"] == alone[name]["usage"]


def test_generate_stream_equals_non_stream(client: TestClient, published: dict[str, str]) -> None:
    body = generate_body(traits={"openness": 1}, max_tokens=32)
    whole = _generate(client, **body)
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_from_text(response.read().decode())
    deltas = [data for name, data in events if name == "message"]
    done = [data for name, data in events if name == "done"]
    assert len(deltas) > 1 and len(done) == 1
    assert "".join(d["delta"] for d in deltas) == whole["text"]
    assert done[0]["finish_reason"] == whole["finish_reason"]
    assert done[0]["usage"] == whole["usage"]
    assert done[0]["persona"] == whole["persona"]
    assert {d["id"] for d in deltas} == {done[0]["id"]}


def test_chat_completions_stream_equals_non_stream(client: TestClient, published: dict[str, str]) -> None:
    body = {
        "model": "big5/sft?extraversion=-1",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 32,
        "temperature": 0,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    whole = response.json()
    assert whole["object"] == "chat.completion" and whole["model"] == body["model"]
    assert whole["persona"]["adapter"] == published["extraversion"]
    text = whole["choices"][0]["message"]["content"]
    assert text.strip()

    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=payload) as streamed:
        assert streamed.status_code == 200
        events = sse_from_text(streamed.read().decode())
    assert events[-1] == ("message", "[DONE]")
    chunks = [data for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == text
    finishing = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishing == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_two_traits_are_served_by_a_composed_adapter(client: TestClient, published: dict[str, str]) -> None:
    result = _generate(client, traits={"openness": 0.5, "extraversion": -1})
    persona = result["persona"]
    assert persona["composed"] is True
    assert persona["adapter"].startswith("composed-")
    assert persona["traits"] == {"openness": 0.5, "extraversion": -1.0}
    assert persona["parts"] == [
        {"adapter": published["openness"], "weight": 0.5},
        {"adapter": published["extraversion"], "weight": 1.0},
    ]
    assert persona["key"] == "big5/sft?openness=0.5&extraversion=-1"
    direct = _generate(client, method="direct")
    openness_only = _generate(client, traits={"openness": 1})
    assert result["text"] not in (direct["text"], openness_only["text"])
    again = _generate(client, traits={"openness": 0.5, "extraversion": -1})  # the composed folder is reused
    assert again["text"] == result["text"] and again["persona"] == persona


def test_metrics_expose_the_counters(client: TestClient, published: dict[str, str]) -> None:
    for _ in range(2):  # a vector no other test uses: one cache miss, then one hit
        _generate(client, traits={"openness": 0.25, "extraversion": -0.5}, max_tokens=4)
    _generate(client, traits={"openness": 1}, max_tokens=4)
    _generate(client, method="direct", max_tokens=4)
    text = client.get("/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}
    assert samples['big5_http_requests_total{method="POST",route="/v1/generate",status="200"}'] >= 4
    assert samples['big5_http_request_duration_seconds_count{method="POST",route="/v1/generate"}'] >= 4
    assert samples['big5_generation_tokens_total{method="sft"}'] > 0
    assert samples['big5_prompt_tokens_total{method="direct"}'] > 0
    assert samples[f'big5_adapter_requests_total{{adapter="{published["openness"]}",kind="single"}}'] >= 1
    assert samples[f'big5_adapter_requests_total{{adapter="{published["extraversion"]}",kind="composed"}}'] >= 2
    assert samples['big5_adapter_requests_total{adapter="none",kind="none"}'] >= 1
    assert samples["big5_composed_cache_misses_total"] >= 1
    assert samples["big5_composed_cache_hits_total"] >= 1
    assert samples["big5_engine_ready"] == 1.0
    assert samples["big5_requests_in_flight"] == 0.0


def test_adapter_registered_after_start_is_served_after_reload(
    client: TestClient, service_stack: Stack, loras: Loras
) -> None:
    direct = _generate(client, method="direct")
    ref = loras.publish(service_stack, "svc-conscientiousness-high", {"conscientiousness": "high"}, 13)

    reload = client.post("/v1/adapters/reload")
    assert reload.status_code == 200, reload.text
    report = reload.json()
    assert report["new"] == [ref] and report["failed"] == [] and report["verified"] == 1
    assert client.post("/v1/adapters/reload").json()["new"] == []  # nothing new the second time

    listed = client.get("/v1/adapters").json()
    row = next(a for a in listed if a["ref"] == ref)
    assert row["state"] == "ready" and row["traits"] == {"conscientiousness": "high"} and row["rank"] == 8
    assert all("path" not in a and "/" not in str(a.get("name")) for a in listed)  # never file paths
    assert client.get(f"/v1/adapters/{ref}").json()["sha256"] == row["sha256"]

    served = _generate(client, traits={"conscientiousness": 1})
    assert served["persona"]["adapter"] == ref
    assert served["text"] != direct["text"]
    models = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert "big5/sft?conscientiousness=1" in models and "big5/direct" in models


def test_request_id_round_trip(client: TestClient) -> None:
    given = client.get("/health", headers={"X-Request-ID": "trace-123"})
    assert given.headers["x-request-id"] == "trace-123"
    fresh = client.get("/health")
    assert len(fresh.headers["x-request-id"]) == 32
    problem = client.post("/v1/generate", json={"prompt": "hi", "bogus": 1}, headers={"X-Request-ID": "trace-456"})
    assert problem.json()["request_id"] == "trace-456" and problem.headers["x-request-id"] == "trace-456"


def test_prompts_are_logged_only_when_asked(
    client: TestClient,
    service_settings: Settings,
    service_stack: Stack,
    engine: PersonaEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "my-private-question-4711"
    caplog.set_level(logging.DEBUG, logger="service")
    _generate(client, prompt=secret, method="direct", max_tokens=4)
    assert not any(secret in r.getMessage() for r in caplog.records)

    app = create_app(with_service(service_settings, log_prompts=True), stack=service_stack, engine=engine)
    with TestClient(app) as logging_client:
        response = logging_client.post(
            "/v1/generate",
            json=generate_body(prompt=secret, method="direct", max_tokens=4),
            headers={"X-Request-ID": "logged-1"},
        )
        assert response.status_code == 200
    logged = [r for r in caplog.records if secret in r.getMessage()]
    assert logged and all(getattr(r, "request_id", None) == "logged-1" for r in logged)
    assert any(response.json()["text"] in r.getMessage() for r in caplog.records if "completion" in r.getMessage())
