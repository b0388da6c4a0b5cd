"""The evaluator's HTTP routes, mounted in the service, on the real engine and PostgreSQL."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.slow

CSV = """id,text,trait,facet,keyed
a1,Am the life of the party.,E,,+
a2,Keep in the background.,E,,-
a3,Worry about things.,N,,+
a4,Remain calm under pressure.,N,,-
"""


def _wait(client: TestClient, assessment_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/assessments/{assessment_id}").json()
        if body["state"] in ("done", "failed"):
            return body
        time.sleep(0.5)
    raise AssertionError("assessment did not finish")


def test_custom_inventory_uploaded_and_scored(client: TestClient) -> None:
    upload = {
        "name": "mini-ef",
        "title": "Four custom items",
        "instruction": "Rate how accurately the statement describes you from 1 (not at all) to 5 (exactly). "
        "Reply with a single number.",
        "statement_template": "Statement: {statement}",
        "scale": {"points": 5, "anchors": ["not at all", "a little", "somewhat", "mostly", "exactly"]},
        "items_csv": CSV,
    }
    created = client.post("/v1/inventories", json=upload)
    assert created.status_code == 201, created.text
    assert created.json()["n_items"] == 4
    assert client.post("/v1/inventories", json=upload).status_code == 409  # same name again

    started = client.post(
        "/v1/assess",
        json={"persona": {"method": "prompt", "traits": {"neuroticism": "high"}}, "inventory": "mini-ef", "runs": 2},
    )
    assert started.status_code == 202, started.text
    body = _wait(client, started.json()["id"])
    assert body["state"] == "done", body["error"]
    assert set(body["traits"]) == {"extraversion", "neuroticism"}
    assert all(1 <= t["mean"] <= 5 for t in body["traits"].values())
    items = client.get(f"/v1/assessments/{body['id']}/items").json()
    assert len(items) == 8 and all(len(i["option_probs"]) == 5 for i in items)
    listed = client.get("/v1/assessments", params={"inventory": "mini-ef", "state": "done"}).json()
    assert body["id"] in {a["id"] for a in listed}


@pytest.mark.parametrize(
    ("csv_text", "needle"),
    [
        ("id,text,trait,facet,keyed\n1,Talk a lot.,X,,+\n", "unknown trait"),
        ("id,text,trait,facet,keyed\n1,Talk a lot.,E,,?\n", "keyed"),
        ("id,text,trait,facet,keyed\n1,Talk a lot.,E,,+\n1,Talk less.,E,,-\n", "duplicate"),
        ("id,text,trait,facet,keyed\n", "no items"),
    ],
)
def test_bad_inventory_rejected_naming_the_row(client: TestClient, csv_text: str, needle: str) -> None:
    upload = {
        "name": "bad-inv",
        "title": "bad",
        "instruction": "Rate 1-5.",
        "scale": {"points": 5, "anchors": ["1", "2", "3", "4", "5"]},
        "items_csv": csv_text,
    }
    response = client.post("/v1/inventories", json=upload)
    assert response.status_code in (400, 422), response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert needle in response.text.lower()


def test_compare_table_and_figure(client: TestClient) -> None:
    for level in ("high", "low"):
        started = client.post(
            "/v1/assess",
            json={"persona": {"method": "prompt", "traits": {"openness": level}}, "inventory": "bfi44", "runs": 1},
        )
        assert started.status_code == 202
        assert _wait(client, started.json()["id"])["state"] == "done"
    table = client.post("/v1/assessments/compare", json={"inventory": "bfi44"}).json()
    (group,) = [g for g in table["groups"] if g["group"]["method"] == "prompt"]  # one comparable group
    assert group["n"] == 2
    cell = group["traits"]["openness"]
    high, low = cell["high"]["mean"], cell["low"]["mean"]
    if high is not None and low is not None:  # a side below the coverage floor has no mean, and then no gap
        assert cell["gap"] == pytest.approx(high - low)
    else:
        assert cell["gap"] is None and min(cell["high"]["coverage"], cell["low"]["coverage"]) < 0.5
    svg = client.post("/v1/assessments/compare", json={"inventory": "bfi44", "format": "svg"})
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml") and b"<svg" in svg.content
