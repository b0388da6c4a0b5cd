"""Safe to expose (issue 28), on the real engine: problem details of adapters that cannot be served name
no server path, and an assessment started with one client key is invisible to another (404, out of
its list and its compare table) while its own key and an admin see it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import delete

from big5core.db import transaction
from big5core.models import Adapter
from big5core.settings import Settings
from big5engine.engine import PersonaEngine
from big5personas.stack import Stack
from service.app import create_app
from tests.service.conftest import with_service
from tests.service.support import Loras, assert_problem, generate_body

CLIENT_A, CLIENT_B, ADMIN = "live-client-a", "live-client-b", "live-admin"
MINI = """id,text,trait,facet,keyed
s1,Am the life of the party.,E,,+
s2,Keep in the background.,E,,-
"""


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(
    service_settings: Settings, service_stack: Stack, engine: PersonaEngine, published: dict[str, str]
) -> Iterator[TestClient]:
    keys = {"api_keys": [SecretStr(CLIENT_A), SecretStr(CLIENT_B)], "admin_keys": [SecretStr(ADMIN)]}
    app = create_app(with_service(service_settings, **keys), stack=service_stack, engine=engine)
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def broken(service_stack: Stack, loras: Loras, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Adapters that verify but cannot be served, under names and traits no other test asks for:
    one whose folder is gone, and a dpo per-trait pair (agreeableness and conscientiousness high)
    whose first part is an rsLoRA adapter (published fine; composing it is refused, naming its folder)."""
    rslora = tmp_path_factory.mktemp("rslora") / "adapter"
    shutil.copytree(loras.folders[14], rslora)
    config_file = rslora / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_rslora": True}))
    own = Loras({**loras.folders, 99: rslora})
    refs = {
        "gone": own.publish(service_stack, "exposure-live-gone", {}, 13),
        "rslora": own.publish(service_stack, "exposure-live-rs", {"agreeableness": "high"}, 99, method="dpo"),
        "plain": own.publish(service_stack, "exposure-live-c", {"conscientiousness": "high"}, 15, method="dpo"),
    }
    with service_stack.sessions() as session:
        gone = session.query(Adapter).filter_by(name="exposure-live-gone").one()
        shutil.rmtree(gone.path)
    yield refs
    with transaction(service_stack.sessions) as session:
        session.execute(delete(Adapter).where(Adapter.name.like("exposure-live-%")))


def _pathless(problem: dict[str, Any], settings: Settings) -> None:
    text = json.dumps(problem)
    assert str(settings.data_dir.resolve()) not in text and str(settings.adapters_dir) not in text, text
    assert "<path>" in problem["detail"], problem["detail"]  # the detail still says what failed, without where


def test_problems_of_unservable_adapters_name_no_path(
    keyed: TestClient, broken: dict[str, str], service_settings: Settings
) -> None:
    key = as_key(CLIENT_A)
    gone = keyed.post("/v1/generate", json=generate_body(adapter=broken["gone"], max_tokens=2), headers=key)
    problem = assert_problem(gone, 409, "adapter-checksum-mismatch")
    assert broken["gone"] in problem["detail"] and "missing" in problem["detail"]
    _pathless(problem, service_settings)

    chat = {"model": f"big5/sft?adapter={broken['gone']}", "messages": [{"role": "user", "content": "hi"}]}
    _pathless(
        assert_problem(keyed.post("/v1/chat/completions", json=chat, headers=key), 409, "adapter-checksum-mismatch"),
        service_settings,
    )

    vector = generate_body(method="dpo", traits={"agreeableness": 1, "conscientiousness": 1}, max_tokens=2)
    composed = assert_problem(keyed.post("/v1/generate", json=vector, headers=key), 409, "composition-failed")
    assert "rsLoRA" in composed["detail"]
    _pathless(composed, service_settings)


def _wait(client: TestClient, assessment_id: str, key: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/v1/assessments/{assessment_id}", headers=as_key(key)).json()
        if body["state"] in ("done", "failed"):
            return body
        time.sleep(0.5)
    raise AssertionError("assessment did not finish")


def test_assessments_are_scoped_to_the_key_that_started_them(keyed: TestClient) -> None:
    upload = {
        "name": "exposure-mini",
        "title": "Two items",
        "instruction": "Rate how accurately the statement describes you from 1 (not at all) to 5 (exactly). "
        "Reply with a single number.",
        "statement_template": "Statement: {statement}",
        "scale": {"points": 5, "anchors": ["not at all", "a little", "somewhat", "mostly", "exactly"]},
        "items_csv": MINI,
    }
    assert keyed.post("/v1/inventories", json=upload, headers=as_key(ADMIN)).status_code == 201
    ids = []
    for level in ("high", "low"):  # a compare group needs both poles
        body = {"persona": {"method": "prompt", "traits": {"extraversion": level}}, "inventory": "exposure-mini"}
        started = keyed.post("/v1/assess", json={**body, "runs": 1}, headers=as_key(CLIENT_A))
        assert started.status_code == 202, started.text
        ids.append(started.json()["id"])
    for assessment_id in ids:
        assert _wait(keyed, assessment_id, CLIENT_A)["state"] == "done"
    mine = ids[0]

    for key in (CLIENT_A, ADMIN):
        assert keyed.get(f"/v1/assessments/{mine}", headers=as_key(key)).status_code == 200
        assert len(keyed.get(f"/v1/assessments/{mine}/items", headers=as_key(key)).json()) == 2
    other = as_key(CLIENT_B)
    assert_problem(keyed.get(f"/v1/assessments/{mine}", headers=other), 404, "assessment-not-found")
    assert_problem(keyed.get(f"/v1/assessments/{mine}/items", headers=other), 404, "assessment-not-found")
    assert not {a["id"] for a in keyed.get("/v1/assessments", headers=other).json()} & set(ids)

    compare = {"inventory": "exposure-mini", "reliability": False}
    for key, n in ((CLIENT_A, 2), (ADMIN, 2), (CLIENT_B, 0)):
        answered = keyed.post("/v1/assessments/compare", json=compare, headers=as_key(key))
        assert answered.status_code == 200, answered.text
        assert sum(group["n"] for group in answered.json()["groups"]) == n, (key, answered.json())
