"""Assessments end to end: the real engine on the bundled model, the real PostgreSQL."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import func, select

from big5core.generation import GenerationResult
from big5core.models import Assessment, ItemResponse, TraitScore
from big5personas.stack import Stack
from evaluator import store
from evaluator.administer import parse_answer
from evaluator.inventories import Inventory
from evaluator.runner import AssessmentRunner
from evaluator.schemas import AssessRequest
from tests.evaluator.support import run_assessment


@pytest.mark.slow
def test_ipip120_logprob_stores_everything(stack: Stack, engine: Any) -> None:
    runner = AssessmentRunner(stack.sessions, stack.resolver, engine)
    request = AssessRequest.model_validate(
        {"persona": {"method": "prompt", "traits": {"extraversion": "high"}}, "inventory": "ipip_neo_120", "runs": 2}
    )
    assessment_id = run_assessment(runner, request)
    with stack.sessions() as session:
        assessment = session.get(Assessment, assessment_id)
        assert assessment is not None and assessment.state == "done", assessment.error if assessment else None
        responses = session.scalars(select(ItemResponse).where(ItemResponse.assessment_id == assessment_id)).all()
        assert len(responses) == 120 * 2
        for r in responses:
            assert r.option_probs is not None and len(r.option_probs) == 5
            assert sum(r.option_probs) == pytest.approx(1.0, abs=1e-6)
            assert 0 < r.option_mass <= 1.0
            assert 1.0 <= r.expected <= 5.0 and r.argmax in range(1, 6)
            if r.option_mass < 0.01:  # below the coverage floor: a recorded non-answer, kept with its distribution
                assert r.value is None and r.parse_error == f"no answer: option mass {r.option_mass:.2g} < floor 0.01"
            else:
                assert r.parse_error is None and r.value == r.expected
        scores = session.scalars(select(TraitScore).where(TraitScore.assessment_id == assessment_id)).all()
        assert sum(s.scope == "trait" for s in scores) == 5
        assert sum(s.scope == "facet" for s in scores) == 30
        for s in scores:  # a trait or facet answered on too few items has no score ("n/a (coverage x%)")
            if s.coverage is not None and s.coverage >= 0.5:
                assert s.mean is not None and 1.0 <= s.mean <= 5.0
            else:
                assert s.mean is None
        assert assessment.summary["option_mass_mean"] > 0
        assert assessment.resolved_persona["method"] == "prompt"
        # z-scores against Johnson's IPIP-NEO-120 norms are present for the scored traits
        assert all(s.z is not None for s in scores if s.scope == "trait" and s.mean is not None)


@pytest.mark.slow
def test_generate_mode_real_engine_records_every_answer(stack: Stack, engine: Any) -> None:
    """The paper's protocol on the real model: every raw text is kept; failures are counted, not defaulted."""
    runner = AssessmentRunner(stack.sessions, stack.resolver, engine)
    request = AssessRequest.model_validate(
        {"persona": {"method": "direct"}, "inventory": "bfi44", "scoring": "generate", "runs": 1, "max_tokens": 16}
    )
    assessment_id = run_assessment(runner, request)
    with stack.sessions() as session:
        assessment = session.get(Assessment, assessment_id)
        assert assessment is not None and assessment.state == "done", assessment.error if assessment else None
        responses = session.scalars(select(ItemResponse).where(ItemResponse.assessment_id == assessment_id)).all()
        assert len(responses) == 44 and all(r.raw_text is not None for r in responses)
        failed = [r for r in responses if r.parse_error]
        assert all(r.value is None for r in failed)
        assert all(r.value == parse_answer(r.raw_text or "")[0] for r in responses if not r.parse_error)
        assert assessment.summary["n_failed"] == len(failed)
        assert assessment.summary["parse_failure_rate"] == pytest.approx(len(failed) / 44)


@dataclass
class PlantedEngine:
    """FAKE engine (named as one): returns planted answers so the parser's bookkeeping can be checked exactly."""

    answers: dict[str, str]
    fail_after: int | None = None
    calls: int = 0

    async def generate(
        self, messages: list[Any], sampling: Any, lora: Any = None, request_id: str | None = None
    ) -> Any:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("engine died (planted)")
        text = messages[-1]["content"]
        for key, answer in self.answers.items():
            if key in text:
                return GenerationResult(text=answer, finish_reason="stop", prompt_tokens=1, completion_tokens=1)
        return GenerationResult(text="3", finish_reason="stop", prompt_tokens=1, completion_tokens=1)

    async def option_scores(self, messages: list[Any], options: list[str], lora: Any = None) -> Any:
        raise AssertionError("not used")

    async def register_lora(self, name: str, path: Any) -> Any:
        return None


def _custom(session: Any) -> str:
    import uuid

    inventory = Inventory.model_validate(
        {
            "name": f"tiny-{uuid.uuid4().hex[:8]}",
            "title": "three items",
            "instruction": "Rate 1 to 5.",
            "statement_template": "Statement: {statement}",
            "scale": {"points": 5, "anchors": ["a", "b", "c", "d", "e"]},
            "items": [
                {"id": "1", "text": "Am the life of the party.", "trait": "E", "keyed": "+"},
                {"id": "2", "text": "Keep in the background.", "trait": "E", "keyed": "-"},
                {"id": "3", "text": "Worry about things.", "trait": "N", "keyed": "+"},
            ],
        }
    )
    store.add_inventory(session, inventory)
    return inventory.name


def test_generate_mode_counts_planted_failures(stack: Stack) -> None:
    with stack.sessions() as session, session.begin():
        name = _custom(session)
    engine = PlantedEngine(
        {"life of the party": "4 - Moderately accurate", "background": "Your score is 2.", "Worry": "banana"}
    )
    runner = AssessmentRunner(stack.sessions, stack.resolver, engine)
    request = AssessRequest.model_validate(
        {"persona": {"method": "direct"}, "inventory": name, "scoring": "generate", "runs": 2}
    )
    assessment_id = run_assessment(runner, request)
    with stack.sessions() as session:
        assessment = session.get(Assessment, assessment_id)
        assert assessment is not None and assessment.state == "done"
        responses = store.responses(session, assessment_id)
        by_item = {(r.run, r.item_id): r for r in responses}
        assert by_item[(0, "1")].value == 4.0 and by_item[(0, "1")].parse_error is None
        assert by_item[(0, "2")].value is None and by_item[(0, "2")].raw_text == "Your score is 2."
        assert by_item[(0, "3")].value is None and "number" in (by_item[(0, "3")].parse_error or "")
        assert assessment.summary["n_failed"] == 4 and assessment.summary["parse_failure_rate"] == pytest.approx(4 / 6)
        scores = {s.key: s for s in assessment.scores if s.scope == "trait"}
        assert scores["extraversion"].mean == 4.0  # only the parsed answer counts; nothing became 3
        assert scores["neuroticism"].mean is None


def test_engine_failure_mid_assessment_leaves_failed_without_items(stack: Stack) -> None:
    with stack.sessions() as session, session.begin():
        name = _custom(session)
    runner = AssessmentRunner(stack.sessions, stack.resolver, PlantedEngine({}, fail_after=4))
    request = AssessRequest.model_validate(
        {"persona": {"method": "direct"}, "inventory": name, "scoring": "generate", "runs": 3}
    )
    assessment_id = run_assessment(runner, request)
    with stack.sessions() as session:
        assessment = session.get(Assessment, assessment_id)
        assert assessment is not None and assessment.state == "failed"
        assert "engine died" in (assessment.error or "")
        count = session.scalar(
            select(func.count()).select_from(ItemResponse).where(ItemResponse.assessment_id == assessment_id)
        )
        assert count == 0
        assert not assessment.scores


def test_a_swept_assessment_is_not_completed_later(stack: Stack) -> None:
    """Another replica's sweep marks a slow assessment failed; when its runner finishes, failed stays."""
    with stack.sessions() as session, session.begin():
        name = _custom(session)

    class SweptMidway(PlantedEngine):
        async def generate(self, *args: Any, **kwargs: Any) -> Any:
            if self.calls == 2:  # while it runs, a sweep elsewhere gives up on it
                with stack.sessions() as session, session.begin():
                    store.fail(session, swept[0], "stale heartbeat (planted sweep)")
            return await super().generate(*args, **kwargs)

    runner = AssessmentRunner(stack.sessions, stack.resolver, SweptMidway({}))
    request = AssessRequest.model_validate(
        {"persona": {"method": "direct"}, "inventory": name, "scoring": "generate", "runs": 2}
    )
    swept: list[str] = []
    assessment_id, resolved, inventory = runner.prepare(request)
    swept.append(assessment_id)
    asyncio.run(runner.run(assessment_id, request, resolved, inventory))
    with stack.sessions() as session:
        assessment = session.get(Assessment, assessment_id)
        assert assessment is not None and assessment.state == "failed"
        assert assessment.error == "stale heartbeat (planted sweep)"  # the sweep's verdict, not overwritten
        count = session.scalar(
            select(func.count()).select_from(ItemResponse).where(ItemResponse.assessment_id == assessment_id)
        )
        assert count == 0 and not assessment.scores


def test_a_long_run_keeps_its_heartbeat_fresh(stack: Stack) -> None:
    """A run longer than its lease is not swept by another replica: the runner renews the lease while it runs."""
    with stack.sessions() as session, session.begin():
        name = _custom(session)

    class Slow(PlantedEngine):
        async def generate(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(2.5)  # one run (its items are concurrent) lasts 2.5 s, the lease 1 s
            return await super().generate(*args, **kwargs)

    runner = AssessmentRunner(stack.sessions, stack.resolver, Slow({}), heartbeat_seconds=0.25, lease_seconds=1)
    replica = AssessmentRunner(stack.sessions, stack.resolver, PlantedEngine({}))
    request = AssessRequest.model_validate(
        {"persona": {"method": "direct"}, "inventory": name, "scoring": "generate", "runs": 1}
    )
    assessment_id, resolved, inventory = runner.prepare(request)

    def observed() -> tuple[str, str]:
        with stack.sessions() as session:
            row = session.get(Assessment, assessment_id)
            assert row is not None
            return row.state, str(row.lease_expires_at)

    async def run_while_sweeping() -> set[str]:
        task = asyncio.create_task(runner.run(assessment_id, request, resolved, inventory))
        beats: set[str] = set()
        while not task.done():
            await asyncio.sleep(0.3)
            await asyncio.to_thread(replica.sweep)  # the other replica's startup sweep
            state, beat = await asyncio.to_thread(observed)
            assert state in ("running", "done"), state
            beats.add(beat)
        await task
        return beats

    beats = asyncio.run(run_while_sweeping())
    state, _ = observed()
    assert state == "done"
    assert len(beats) >= 4  # the lease was renewed during the run, not only at its end


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4", 4),
        (" 5.", 5),
        ("1 - Very inaccurate", 1),
        ("3)", 3),
        ("(2)", 2),
        ("2\nBecause...", 2),
        ("Your score is 1.", None),
        ("45", None),
        ("0", None),
        ("", None),
        ("I'd say 4", None),
        ("6", None),
    ],
)
def test_strict_parse(text: str, value: int | None) -> None:
    assert parse_answer(text)[0] == value
