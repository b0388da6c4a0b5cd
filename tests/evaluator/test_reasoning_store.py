"""Reasoning runs in the real PostgreSQL: a unit stored whole, its items read back as the API shows them."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from big5core import lease
from big5core.db import transaction
from evaluator.reasoning import store
from evaluator.reasoning.harness import ItemResult, UnitResult
from evaluator.reasoning.routes import run_out
from evaluator.reasoning.schemas import ReasoningAccepted, ReasoningItemOut
from evaluator.schemas import AssessAccepted


def _unit(persona_key: str) -> UnitResult:
    items = [
        ItemResult(0, "q0", "A", 1.0, True, loglikelihoods=[-0.1, -2.0], greedy=[True, False], metrics={"acc": 1}),
        ItemResult(1, "q1", "7", 0.0, False, generated="The answer is 8.", metrics={"exact_match,none": 0.0}),
    ]
    return UnitResult(
        task="piqa",
        lm_task="big5_piqa",
        persona_key=persona_key,
        method="direct",
        resolved_persona={"method": "direct", "traits": {}},
        lm_eval_version="0.4",
        task_config_hash="h" * 64,
        task_config={"task": "big5_piqa"},
        metrics={"acc,none": 0.5},
        items=items,
        seconds=1.5,
    )


def test_a_stored_unit_reads_back_item_by_item(pg_sessions: sessionmaker[Session]) -> None:
    with transaction(pg_sessions) as session:
        run_id = store.create(
            session,
            personas=["big5/direct"],
            tasks=["piqa"],
            limit=2,
            options={},
            lm_eval_version="0.4",
            progress={"units_done": 0, "units": 1, "owner": "host:1:abc"},
        ).id
        store.mark_running(session, run_id, {"units_done": 0, "units": 1}, lease.taken("host:1:abc", 600))
        store.add_unit(session, run_id, _unit("big5/direct"))
        assert store.complete(session, run_id, expected_units=1)
    with pg_sessions() as session:
        rows = [ReasoningItemOut.of(r, i) for r, i in store.items(session, run_id)]
        out = run_out(store.get(session, run_id))
    assert [r.model_dump() for r in rows] == [
        {
            "task": "piqa",
            "persona_key": "big5/direct",
            "doc_index": 0,
            "item_id": "q0",
            "target": "A",
            "loglikelihoods": [-0.1, -2.0],
            "greedy": [True, False],
            "generated": None,
            "score": 1.0,
            "correct": True,
            "metrics": {"acc": 1},
        },
        {
            "task": "piqa",
            "persona_key": "big5/direct",
            "doc_index": 1,
            "item_id": "q1",
            "target": "7",
            "loglikelihoods": None,
            "greedy": None,
            "generated": "The answer is 8.",
            "score": 0.0,
            "correct": False,
            "metrics": {"exact_match,none": 0.0},
        },
    ]
    assert out.state == "done" and out.progress == {"units_done": 0, "units": 1}  # the owner is not shown
    assert [(u.task, u.n_items, u.seconds) for u in out.results] == [("piqa", 2, 1.5)]


def test_accepted_replies_link_the_run_and_its_items() -> None:
    for model, collection in ((ReasoningAccepted, "/v1/reasoning"), (AssessAccepted, "/v1/assessments")):
        accepted = model.queued(collection, "abc")
        assert isinstance(accepted, model)
        assert accepted.model_dump() == {
            "id": "abc",
            "state": "queued",
            "links": {"self": f"{collection}/abc", "items": f"{collection}/abc/items"},
        }
