"""HTTP errors that need no engine: schema (422), unknown things (404), keys (401/403), body size (413),
engine not ready (503), the problem table's categories, and the unversioned aliases of the design.

The app is given a real :class:`PersonaEngine` that is never started (the app starts only an engine
it builds itself), so these tests are not slow: nothing here reaches generation.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

import big5core.errors as categories
from big5core.settings import Settings
from big5engine.engine import PersonaEngine
from big5personas.stack import Stack
from service import errors
from service.app import create_app
from tests.engine_support import TEST_ENGINE
from tests.service.conftest import with_service
from tests.service.support import assert_problem, generate_body

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def unstarted(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> PersonaEngine:
    return PersonaEngine(str(bundled_model_path), TEST_ENGINE, work_dir=tmp_path_factory.mktemp("unstarted"))


@pytest.fixture(scope="module")
def client(service_settings: Settings, service_stack: Stack, unstarted: PersonaEngine) -> Iterator[TestClient]:
    with TestClient(create_app(service_settings, stack=service_stack, engine=unstarted)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def keyed_client(service_settings: Settings, service_stack: Stack, unstarted: PersonaEngine) -> Iterator[TestClient]:
    settings = with_service(service_settings, api_keys=[SecretStr("client-key")], admin_keys=[SecretStr("admin-key")])
    with TestClient(create_app(settings, stack=service_stack, engine=unstarted)) as test_client:
        yield test_client


# ---------------------------------------------------------------- 422


@pytest.mark.parametrize("path", ["/v1/generate", "/generate"])
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
def test_invalid_generate_bodies_are_422(client: TestClient, path: str, body: dict[str, Any], field: str) -> None:
    problem = assert_problem(client.post(path, json=body), 422, "validation-error")
    fields = [e["field"] for e in problem["errors"]]
    assert any(f == field or f.startswith(field + ".") for f in fields), fields
    assert field.removeprefix("body.").split(".")[0] in problem["detail"] or field == "body"


def test_openai_request_validation(client: TestClient) -> None:
    base = {"model": "big5/direct", "messages": [{"role": "user", "content": "hi"}]}
    problem = assert_problem(client.post("/v1/chat/completions", json={**base, "n": 2}), 422, "validation-error")
    assert [e["field"] for e in problem["errors"]] == ["body.n"]
    assert_problem(client.post("/v1/chat/completions", json={**base, "logit_bias": {}}), 422, "validation-error")
    assert_problem(client.post("/v1/training-jobs", json={"method": "ppo"}), 422, "validation-error")


# ---------------------------------------------------------------- 404


def test_other_unknown_things_are_404(client: TestClient) -> None:
    assert_problem(client.get("/v1/assessments/0123456789abcdef"), 404, "assessment-not-found")
    assert_problem(client.get("/v1/training-jobs/0123456789abcdef"), 404, "training-job-not-found")
    assert_problem(client.get("/v1/inventories/no-such-inventory"), 404, "inventory-not-found")
    assert_problem(client.get("/v1/adapters/svc-missing"), 404, "adapter-not-found")
    assert_problem(client.get("/v1/nothing-here"), 404, "not-found")


# ---------------------------------------------------------------- 401 / 403


def test_keys_are_required_when_configured(keyed_client: TestClient) -> None:
    body = generate_body(method="direct", max_tokens=2)
    for path in ("/v1/generate", "/generate"):
        missing = assert_problem(keyed_client.post(path, json=body), 401, "unauthorized")
        assert "API key" in missing["detail"]
    assert keyed_client.post("/v1/generate", json=body).headers["www-authenticate"].startswith("Bearer")
    wrong = {"Authorization": "Bearer not-a-key"}
    assert_problem(keyed_client.post("/v1/generate", json=body, headers=wrong), 401, "unauthorized")
    assert_problem(keyed_client.get("/v1/adapters"), 401, "unauthorized")
    assert_problem(keyed_client.get("/v1/assessments"), 401, "unauthorized")  # the evaluator's routes too
    assert_problem(keyed_client.post("/assess", json={}), 401, "unauthorized")
    assert keyed_client.get("/v1/adapters", headers={"X-API-Key": "client-key"}).status_code == 200
    assert keyed_client.get("/health", params={"live": "true"}).status_code == 200  # operations need no key


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


# ---------------------------------------------------------------- 413


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


# ---------------------------------------------------------------- 503


def test_engine_not_ready_is_503_with_retry_after(client: TestClient, unstarted: PersonaEngine) -> None:
    for params in ({}, {"ready": "true"}):  # /health is the readiness probe: not ready, a 503 problem
        health = assert_problem(client.get("/health", params=params), 503, "engine-not-ready")
        assert health["state"] == "loading" and health["base_model"]
    assert int(client.get("/health").headers["retry-after"]) > 0
    live = client.get("/health", params={"live": "true"})  # the liveness probe: loading is alive
    assert live.status_code == 200 and live.json()["status"] == "loading"
    for path in ("/v1/generate", "/generate"):
        generate = client.post(path, json=generate_body(method="direct"))
        assert_problem(generate, 503, "engine-not-ready")
        assert int(generate.headers["retry-after"]) > 0
    chat = {"model": "big5/direct", "messages": [{"role": "user", "content": "hi"}]}
    assert_problem(client.post("/v1/chat/completions", json=chat), 503, "engine-not-ready")
    assess = {"persona": {"method": "direct"}, "inventory": "bfi44", "runs": 1}
    for path in ("/v1/assess", "/assess"):
        assert_problem(client.post(path, json=assess), 503, "engine-not-ready")
    assert client.get("/v1/adapters").status_code == 200  # the registry view does not need the engine
    assert not unstarted.ready and not unstarted.starting  # a given engine is not started by the app


# ---------------------------------------------------------------- the design's names and the table


def test_unversioned_aliases_are_in_the_openapi_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for alias, v1 in (("/generate", "/v1/generate"), ("/assess", "/v1/assess")):
        assert set(paths[alias]) == set(paths[v1]) == {"post"}
        alias_op, v1_op = paths[alias]["post"], paths[v1]["post"]
        assert alias_op["requestBody"] == v1_op["requestBody"]
        assert alias_op["responses"] == v1_op["responses"]
        assert alias_op["operationId"] != v1_op["operationId"] and v1 in alias_op["summary"]


def _domain_error_classes() -> list[type[BaseException]]:
    import big5core.jobs
    import big5engine.compose
    import big5engine.errors
    import big5engine.modelstore
    import big5engine.option_tokens
    import big5personas.registry
    import big5personas.resolver
    import big5personas.spec
    import evaluator.inventories
    import evaluator.store
    import trainer.lease

    modules = [big5engine.compose, big5engine.errors, big5core.jobs, big5engine.modelstore, big5personas.resolver]
    modules += [big5personas.spec, big5engine.option_tokens, big5personas.registry, evaluator.inventories]
    modules += [evaluator.store, trainer.lease]
    return [
        value
        for module in modules
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == module.__name__
    ]


def test_every_domain_error_has_a_category_that_the_table_maps() -> None:
    status = {
        categories.NotFound: 404,
        categories.Invalid: 400,
        categories.Conflict: 409,
        categories.NotReady: 409,
        categories.Unavailable: 503,
    }
    found = _domain_error_classes()
    assert len(found) >= 15, found
    for cls in found:
        if cls.__name__ in {"RanksOutOfStep"}:
            continue
        assert issubclass(cls, categories.DomainError), f"{cls.__module__}.{cls.__name__} has no category"
        exc = cls.__new__(cls)
        Exception.__init__(exc, "x")
        kind = errors.kind_of(exc)
        category = next(c for c in cls.__mro__ if c in status)
        assert kind.status == status[category], cls
        assert kind.slug == cls.code != category.code, f"{cls.__name__} needs its own code"


def test_the_service_imports_no_edge_exception_classes() -> None:
    tree = ast.parse((ROOT / "service" / "errors.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [m for m in imported if m and m.split(".")[0] in ("evaluator", "trainer")], imported
    assert "big5core.errors" in imported
