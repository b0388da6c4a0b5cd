"""Safe to expose (issue 28): auth that fails closed at start, /metrics behind a key, no server paths in
what clients read, and assessments scoped to the key that created them.

No engine runs here: the apps get a real :class:`PersonaEngine` that is never started (as in
test_http_errors.py), and ``big5 serve`` is run up to the point where it refuses, or logs how it
authenticates and then stops at a missing database URL, before anything heavy starts.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError
from sqlalchemy import delete
from typer.testing import CliRunner

from big5core.db import transaction
from big5core.models import Adapter, Assessment
from big5core.settings import ServiceSettings, Settings
from big5engine.engine import PersonaEngine
from big5personas.stack import Stack
from evaluator import store
from service.app import create_app
from service.cli import REFUSED_EXIT, register
from service.deps import InsecureExposure, check_exposure, is_loopback, key_id
from tests.engine_support import TEST_ENGINE
from tests.service.conftest import with_service
from tests.service.support import Loras, assert_problem

CLIENT_A, CLIENT_B, ADMIN = "client-key-a", "client-key-b", "admin-key"
KEYS = {"api_keys": [SecretStr(CLIENT_A), SecretStr(CLIENT_B)], "admin_keys": [SecretStr(ADMIN)]}


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def unstarted(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> PersonaEngine:
    return PersonaEngine(str(bundled_model_path), TEST_ENGINE, work_dir=tmp_path_factory.mktemp("unstarted"))


@pytest.fixture(scope="module")
def open_client(service_settings: Settings, service_stack: Stack, unstarted: PersonaEngine) -> Iterator[TestClient]:
    """Authentication off (no keys): the single-user default."""
    with TestClient(create_app(service_settings, stack=service_stack, engine=unstarted)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def keyed_client(service_settings: Settings, service_stack: Stack, unstarted: PersonaEngine) -> Iterator[TestClient]:
    settings = with_service(service_settings, **KEYS)
    with TestClient(create_app(settings, stack=service_stack, engine=unstarted)) as test_client:
        yield test_client


# ---------------------------------------------------------------- big5 serve refuses to fail open


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("192.168.1.2", False),
        ("api.example.org", False),
        ("", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_no_keys_beyond_loopback_is_refused_unless_insecure_is_explicit() -> None:
    with pytest.raises(InsecureExposure, match="--insecure-no-auth"):
        check_exposure(ServiceSettings(), "0.0.0.0")
    level, line = check_exposure(ServiceSettings(insecure_no_auth=True), "0.0.0.0")
    assert level == logging.WARNING and "OFF" in line and "every caller" in line
    level, line = check_exposure(ServiceSettings(), "127.0.0.1")
    assert level == logging.WARNING and "Authentication is OFF" in line and "loopback" in line
    level, line = check_exposure(ServiceSettings(api_keys=[SecretStr("k")]), "0.0.0.0")
    assert level == logging.INFO and "Authentication is on" in line


@pytest.mark.parametrize("keys", ['[""]', '["  "]', '["real", ""]'])
def test_a_blank_key_is_a_settings_error_not_an_open_door(keys: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``'["${KEY}"]'`` with KEY unset renders as a list with an empty key: refused, never auth with no key."""
    monkeypatch.setenv("BIG5_SERVICE__ADMIN_KEYS", keys)
    with pytest.raises(ValidationError, match="empty or blank"):
        Settings()


@pytest.fixture()
def serve_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """An environment in which ``big5 serve`` stops before building anything: no keys, and no database
    URL while one is required. ``big5 serve`` reconfigures the root logger: restored afterwards."""
    import os

    for name in [k for k in os.environ if k.startswith("BIG5_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("BIG5_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BIG5_REQUIRE_DATABASE_URL", "1")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def _serve(*args: str) -> Any:
    """``big5 serve ARGS`` (the command as the ``big5`` script registers it)."""
    cli = typer.Typer()
    cli.callback()(lambda: None)  # a group, so that the command keeps its name
    register(cli)
    return CliRunner().invoke(cli, ["serve", *args])


def test_serve_beyond_loopback_without_keys_refuses_to_start(serve_env: None, tmp_path: Path) -> None:
    result = _serve("--host", "0.0.0.0", "--port", "8000")
    assert result.exit_code == REFUSED_EXIT, result.output
    assert "refusing to serve on 0.0.0.0 without API keys" in result.output
    assert "BIG5_SERVICE__API_KEYS" in result.output and "--insecure-no-auth" in result.output
    assert "BIG5_DATABASE_URL" not in result.output  # refused before anything else was looked at
    assert list(tmp_path.iterdir()) == []  # nothing built


@pytest.mark.parametrize("how", ["flag", "setting"])
def test_serve_insecure_no_auth_logs_a_warning(serve_env: None, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "setting":
        monkeypatch.setenv("BIG5_SERVICE__INSECURE_NO_AUTH", "1")
    result = _serve("--host", "0.0.0.0", *(["--insecure-no-auth"] if how == "flag" else []))
    # past the exposure check (with its warning); stopped at the database URL the image requires
    assert "WARNING service.cli" in result.output and "Authentication is OFF on 0.0.0.0" in result.output
    assert result.exit_code == REFUSED_EXIT and "BIG5_DATABASE_URL is not set" in result.output


def test_serve_on_loopback_without_keys_says_auth_is_off(serve_env: None) -> None:
    result = _serve("--host", "127.0.0.1")
    assert "Authentication is OFF (no API keys configured)" in result.output, result.output
    assert "BIG5_DATABASE_URL is not set" in result.output


def test_serve_with_keys_says_auth_is_on(serve_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIG5_SERVICE__API_KEYS", '["client-secret-1"]')
    monkeypatch.setenv("BIG5_SERVICE__ADMIN_KEYS", '["admin-secret-1"]')
    result = _serve("--host", "0.0.0.0")
    assert "Authentication is on: 1 client key(s), 1 admin key(s)" in result.output, result.output
    assert "secret-1" not in result.output


# ---------------------------------------------------------------- /metrics


def test_metrics_need_a_key_when_keys_are_set(keyed_client: TestClient) -> None:
    assert_problem(keyed_client.get("/metrics"), 401, "unauthorized")
    assert_problem(keyed_client.get("/metrics", headers=as_key("wrong")), 401, "unauthorized")
    answered = keyed_client.get("/metrics", headers=as_key(CLIENT_A))
    assert answered.status_code == 200 and "big5_http_requests" in answered.text
    assert keyed_client.get("/metrics", headers={"X-API-Key": ADMIN}).status_code == 200
    assert keyed_client.get("/health", params={"live": "true"}).status_code == 200  # probes still need no key


def test_metrics_can_be_opened(service_settings: Settings, service_stack: Stack, unstarted: PersonaEngine) -> None:
    settings = with_service(service_settings, metrics_public=True, **KEYS)
    with TestClient(create_app(settings, stack=service_stack, engine=unstarted)) as test_client:
        assert test_client.get("/metrics").status_code == 200
        assert_problem(test_client.get("/v1/adapters"), 401, "unauthorized")  # nothing else opens


def test_metrics_are_open_when_auth_is_off(open_client: TestClient) -> None:
    assert open_client.get("/metrics").status_code == 200


def test_openapi_documents_the_metrics_401(keyed_client: TestClient) -> None:
    operation = keyed_client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert operation.get("security") and "401" in operation["responses"]


# ---------------------------------------------------------------- no server paths


def test_reload_report_names_no_path(
    open_client: TestClient, service_stack: Stack, loras: Loras, service_settings: Settings
) -> None:
    """A ready adapter whose folder is gone: the reload reports it by ref, without the folder."""
    ref = loras.publish(service_stack, "exposure-gone", {}, 13)  # no traits: nothing resolves to it by traits
    with service_stack.sessions() as session:
        row = session.query(Adapter).filter_by(name="exposure-gone").one()
        folder = Path(row.path)
    try:
        shutil.rmtree(folder)
        report = open_client.post("/v1/adapters/reload")
        assert report.status_code == 200, report.text
        failed = {f["ref"]: f["detail"] for f in report.json()["failed"]}
        assert ref in failed and "missing" in failed[ref]
        data_dir = str(service_settings.data_dir.resolve())
        assert data_dir not in report.text and str(folder) not in report.text
        assert "/" not in failed[ref].replace(ref, ""), failed[ref]
    finally:
        with transaction(service_stack.sessions) as session:
            session.execute(delete(Adapter).where(Adapter.name == "exposure-gone"))


def test_assessment_errors_name_no_path(open_client: TestClient, service_stack: Stack) -> None:
    """A failed assessment's error (an exception's message) reaches the client without server paths."""
    with transaction(service_stack.sessions) as session:
        row = _create(session, None)
        assessment_id = row.id
        store.fail(session, row.id, "DatasetError: no such file or folder: /data/datasets/heldout.csv")
    body = open_client.get(f"/v1/assessments/{assessment_id}").json()
    assert body["state"] == "failed" and body["error"] == "DatasetError: no such file or folder: <path>"


# ---------------------------------------------------------------- assessments scoped by key


def _create(session: Any, owner_key: str | None, inventory: str = "bfi44") -> Assessment:
    return store.create(
        session,
        persona={"method": "direct"},
        resolved={},
        persona_key="big5/direct",
        method="direct",
        inventory=store.inventory_record(session, inventory),
        scoring="logprob",
        runs=1,
        options={},
        owner_key=owner_key,
    )


@pytest.fixture(scope="module")
def owned(service_stack: Stack) -> Iterator[dict[str, str]]:
    """One assessment per key (and one made with authentication off): name -> id."""
    with transaction(service_stack.sessions) as session:
        made = {
            "a": _create(session, key_id(CLIENT_A)).id,
            "b": _create(session, key_id(CLIENT_B)).id,
            "admin": _create(session, key_id(ADMIN)).id,
            "anonymous": _create(session, None).id,
        }
    yield made
    with transaction(service_stack.sessions) as session:
        session.execute(delete(Assessment).where(Assessment.id.in_(list(made.values()))))


def _listed(client: TestClient, key: str) -> set[str]:
    answered = client.get("/v1/assessments", params={"limit": 500}, headers=as_key(key))
    assert answered.status_code == 200, answered.text
    return {a["id"] for a in answered.json()}


def test_a_client_sees_only_its_own_assessments(keyed_client: TestClient, owned: dict[str, str]) -> None:
    mine, theirs = owned["a"], owned["b"]
    assert keyed_client.get(f"/v1/assessments/{mine}", headers=as_key(CLIENT_A)).status_code == 200
    assert keyed_client.get(f"/v1/assessments/{mine}/items", headers=as_key(CLIENT_A)).json() == []
    for other in (theirs, owned["admin"], owned["anonymous"]):
        problem = assert_problem(
            keyed_client.get(f"/v1/assessments/{other}", headers=as_key(CLIENT_A)), 404, "assessment-not-found"
        )
        assert other in problem["detail"]  # the same answer as for an id that does not exist
        assert_problem(
            keyed_client.get(f"/v1/assessments/{other}/items", headers=as_key(CLIENT_A)), 404, "assessment-not-found"
        )
    listed = _listed(keyed_client, CLIENT_A)
    assert mine in listed and not listed & {theirs, owned["admin"], owned["anonymous"]}
    assert _listed(keyed_client, CLIENT_B) & set(owned.values()) == {theirs}


def test_an_admin_sees_every_assessment(keyed_client: TestClient, owned: dict[str, str]) -> None:
    assert set(owned.values()) <= _listed(keyed_client, ADMIN)
    for assessment_id in owned.values():
        assert keyed_client.get(f"/v1/assessments/{assessment_id}", headers=as_key(ADMIN)).status_code == 200


def test_without_auth_every_assessment_is_visible(open_client: TestClient, owned: dict[str, str]) -> None:
    listed = {a["id"] for a in open_client.get("/v1/assessments", params={"limit": 500}).json()}
    assert set(owned.values()) <= listed


def test_the_owner_is_a_key_id_never_the_key(service_stack: Stack, owned: dict[str, str]) -> None:
    with service_stack.sessions() as session:
        stored = session.get(Assessment, owned["a"])
        assert stored is not None and stored.owner_key == key_id(CLIENT_A)
    assert CLIENT_A not in key_id(CLIENT_A) and key_id(CLIENT_A) != key_id(CLIENT_B)
    assert len(key_id(CLIENT_A)) <= 64
