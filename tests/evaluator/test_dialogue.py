"""The dialogue assessment: held-out Speaker X turns, replies judged, stored like questionnaire items."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from big5core.dataset import BUNDLED_REAL, heldout_split, load_filtered
from big5core.generation import DEFAULT_DECODING, ContinuationScore, GenerationResult
from big5core.models import Assessment, ItemResponse, TraitScore
from big5core.traits import TRAITS
from big5personas.stack import Stack
from evaluator.dialogue import DialogueSetError, load_dialogue_set
from evaluator.inventories import DIALOGUE_INVENTORY
from evaluator.judge import JudgeStore
from evaluator.runner import AssessmentRunner
from evaluator.schemas import AssessRequest
from tests.evaluator.support import run_assessment


@pytest.fixture(scope="module")
def judges(tmp_path_factory: pytest.TempPathFactory) -> JudgeStore:
    store = JudgeStore(tmp_path_factory.mktemp("judges"))
    store.get()
    return store


def test_the_turns_come_from_held_out_scenarios_only() -> None:
    turns = load_dialogue_set()
    rows, _ = load_filtered(BUNDLED_REAL)
    train, held = heldout_split(rows)
    assert {i.scenario for i in turns.items} <= {r.scenario for r in held}
    assert not {i.scenario for i in turns.items} & {r.scenario for r in train}
    assert len(turns.items) == len({i.text for i in turns.items}) >= 20
    assert len(turns.items_hash) == 64 and load_dialogue_set().items_hash == turns.items_hash


def test_a_file_that_is_all_held_out_and_a_bad_source(tmp_path: Path) -> None:
    path = tmp_path / "held.csv"
    path.write_text(
        "original_index,trait,level,train_input,train_output\n"
        "s1,openness,high,Want to try the new place?,Yes! Let's go.\n"
        "s2,openness,low,Want to try the new place?,Nah.\n"
        "s3,openness,high,Shall we hike?,Sure.\n"
    )
    turns = load_dialogue_set(str(path), "all")
    assert [i.text for i in turns.items] == ["Want to try the new place?", "Shall we hike?"]
    with pytest.raises(DialogueSetError, match="no such file"):
        load_dialogue_set(str(tmp_path / "missing.csv"))


def test_request_defaults_and_refusals() -> None:
    request = AssessRequest.model_validate({"persona": {"method": "direct"}, "inventory": DIALOGUE_INVENTORY})
    assert (request.scoring, request.max_tokens, request.runs) == ("judge", 64, 1)
    sampling = request.dialogue_sampling()  # the service's default decoding, unless the request asks otherwise
    assert (sampling.temperature, sampling.repetition_penalty) == (
        DEFAULT_DECODING.temperature,
        DEFAULT_DECODING.repetition_penalty,
    )
    greedy = AssessRequest.model_validate(
        {"persona": {"method": "direct"}, "inventory": DIALOGUE_INVENTORY, "temperature": 0, "repetition_penalty": 1}
    ).dialogue_sampling()
    assert (greedy.temperature, greedy.repetition_penalty, greedy.max_tokens) == (0.0, 1.0, 64)
    with pytest.raises(ValidationError, match="scored by the trait judge"):
        AssessRequest.model_validate(
            {"persona": {"method": "direct"}, "inventory": DIALOGUE_INVENTORY, "scoring": "logprob"}
        )
    with pytest.raises(ValidationError, match="max_items"):
        AssessRequest.model_validate({"persona": {"method": "direct"}, "inventory": "bfi44", "max_items": 3})
    with pytest.raises(ValidationError, match="judge"):
        AssessRequest.model_validate({"persona": {"method": "direct"}, "inventory": "bfi44", "scoring": "judge"})


@dataclass
class FlakyEngine:
    """FAKE engine (named as one): fails one turn and answers another with nothing, to check the bookkeeping."""

    async def generate(
        self, messages: list[Any], sampling: Any, lora: Any = None, request_id: str | None = None
    ) -> Any:
        text = messages[-1]["content"]
        if text == self.fail_on:
            raise RuntimeError("planted failure")
        reply = "" if text == self.empty_on else "Oh wow, yes! Let's all go together, it'll be a blast!"
        return GenerationResult(text=reply, finish_reason="stop", prompt_tokens=1, completion_tokens=1)

    async def option_scores(self, messages: list[Any], options: list[str], lora: Any = None) -> Any:
        raise AssertionError("not used")

    def render(self, messages: list[Any]) -> str:
        return messages[-1]["content"]

    async def continuation_logprobs(self, prompt: str, continuations: list[str], lora: Any = None) -> list[Any]:
        assert lora is None  # the base model's perplexity
        return [ContinuationScore(logprob=-3.0 * len(c.split()), n_tokens=len(c.split()), n_chars=len(c), greedy=False)
                for c in continuations]  # fmt: skip

    async def register_lora(self, name: str, path: Any) -> Any:
        return None

    fail_on: str = ""
    empty_on: str = ""


def test_failed_and_empty_replies_are_recorded_never_defaulted(stack: Stack, judges: JudgeStore) -> None:
    turns = load_dialogue_set()
    engine = FlakyEngine(fail_on=turns.items[0].text, empty_on=turns.items[1].text)
    runner = AssessmentRunner(stack.sessions, stack.resolver, engine, judges=judges)
    request = AssessRequest.model_validate(
        {"persona": {"method": "direct"}, "inventory": DIALOGUE_INVENTORY, "max_items": 5}
    )
    assessment_id = run_assessment(runner, request)
    with stack.sessions() as session:
        assessment = session.get(Assessment, assessment_id)
        assert assessment is not None and assessment.state == "done", assessment.error if assessment else None
        responses = session.scalars(select(ItemResponse).where(ItemResponse.assessment_id == assessment_id)).all()
        by_item = {r.item_id: r for r in responses}
        assert len(by_item) == 5
        failed = by_item[turns.items[0].id]
        assert failed.parse_error.startswith("generation failed: RuntimeError") and failed.judge_scores is None
        empty = by_item[turns.items[1].id]
        assert empty.parse_error == "empty reply" and empty.judge_scores is None
        answered = [r for r in responses if r.parse_error is None]
        assert len(answered) == 3 and all(set(r.judge_scores) == {t.value for t in TRAITS} for r in answered)
        assert assessment.summary["n_failed"] == 2
        for r in answered:  # each answered reply's quality is stored with it
            assert r.quality["repetition"] == 0.0 and r.quality["opening"] == "oh wow yes"
            assert r.quality["perplexity"] == pytest.approx(math.exp(3.0)) and r.quality["relevance"] >= 0.0
        assert failed.quality is None and empty.quality is None
        summary = assessment.summary["quality"]
        assert summary["n"] == 3 and summary["shared_opening"] == 1.0 and summary["top_opening"] == "oh wow yes"
        assert assessment.summary["dialogue"]["extraversion"]["n"] == 3
        assert assessment.scoring_mode == "judge"


@pytest.mark.slow
def test_dialogue_assessment_on_the_real_engine(stack: Stack, engine: Any, judges: JudgeStore) -> None:
    runner = AssessmentRunner(stack.sessions, stack.resolver, engine, judges=judges)
    request = AssessRequest.model_validate(
        {
            "persona": {"method": "prompt", "traits": {"extraversion": "high"}},
            "inventory": DIALOGUE_INVENTORY,
            "max_items": 4,
            "max_tokens": 24,
        }
    )
    assessment_id = run_assessment(runner, request)
    with stack.sessions() as session:
        assessment = session.get(Assessment, assessment_id)
        assert assessment is not None and assessment.state == "done", assessment.error if assessment else None
        responses = session.scalars(select(ItemResponse).where(ItemResponse.assessment_id == assessment_id)).all()
        assert len(responses) == 4
        for r in responses:
            assert r.raw_text and r.parse_error is None
            assert set(r.judge_scores) == {t.value for t in TRAITS}
            assert all(0.0 <= p <= 1.0 for p in r.judge_scores.values())
        scores = session.scalars(select(TraitScore).where(TraitScore.assessment_id == assessment_id)).all()
        assert {s.key for s in scores} == {t.value for t in TRAITS}
        means = {s.key: s.mean for s in scores}
        expected = sum(r.judge_scores["extraversion"] for r in responses) / 4
        assert means["extraversion"] == pytest.approx(expected)
        low, high = assessment.summary["dialogue"]["extraversion"]["ci95"]
        assert low <= expected <= high
        assert assessment.options["dialogue_set"]["items_hash"] == load_dialogue_set().items_hash
        assert assessment.summary["judge"]["sha256"] == judges.get().card.sha256
        assert assessment.resolved_persona["method"] == "prompt"
    # greedy decoding: the same persona and turns give the same replies again
    again = run_assessment(runner, request)
    with stack.sessions() as session:
        first = sorted((r.item_id, r.raw_text) for r in responses)
        second = session.scalars(select(ItemResponse).where(ItemResponse.assessment_id == again)).all()
        assert sorted((r.item_id, r.raw_text) for r in second) == first


def _add_adapter(session: Any, name: str, hyperparams: dict[str, Any]) -> None:
    from big5core.models import Adapter

    session.add(
        Adapter(
            name=name,
            version=1,
            base_model="b",
            method="sft",
            layout="per-trait",
            traits={},
            rank=8,
            hyperparams=hyperparams,
            path="/nonexistent",
            state="ready",
        )  # fmt: skip
    )


def _persona(ref: str) -> Any:
    from big5core.prompts import TemplateId
    from big5core.traits import Method
    from big5personas.resolver import ResolvedPersona

    return ResolvedPersona(Method.SFT, {}, TemplateId.PLAIN, ref, parts=({"adapter": ref, "weight": 1.0},))


def test_an_adapter_that_saw_the_held_out_scenarios_is_refused(stack: Stack) -> None:
    from evaluator.dialogue import HeldOutOverlap, check_unseen

    turns = load_dialogue_set()
    with stack.sessions() as session:
        for name, fraction in (("sft-leaky", 0.1), ("sft-clean", 0.2)):
            _add_adapter(session, name, {"dataset": BUNDLED_REAL, "test_fraction": fraction, "seed": 0})
        session.commit()
        check_unseen(session, _persona("sft-clean"), turns)
        with pytest.raises(HeldOutOverlap, match="test_fraction 0.1"):
            check_unseen(session, _persona("sft-leaky"), turns)
        # a whole held-out file is not the training source: nothing is known to overlap
        check_unseen(session, _persona("sft-leaky"), turns.model_copy(update={"split": "all"}))


def test_an_adapter_trained_on_a_file_of_held_out_scenarios_is_refused(stack: Stack, tmp_path: Path) -> None:
    """E.g. rows that `big5 datagen` generated for held-out scenarios: another source, the same scenarios."""
    import csv

    from big5core.dataset import bundled_path, heldout_split, load_filtered
    from evaluator.dialogue import HeldOutOverlap, check_unseen

    train, held = heldout_split(load_filtered(BUNDLED_REAL)[0])
    with bundled_path().open(newline="") as f:
        records = list(csv.DictReader(f))
    files = {}
    for name, scenarios in (("gen-leaky", {r.scenario for r in held}), ("gen-clean", {r.scenario for r in train})):
        path = tmp_path / f"{name}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(r for r in records if str(r["original_index"]) in scenarios)
        files[name] = path
    turns = load_dialogue_set()
    with stack.sessions() as session:
        for name, path in files.items():
            _add_adapter(session, name, {"dataset": str(path), "test_fraction": 0.0, "seed": 0})
        session.commit()
        check_unseen(session, _persona("gen-clean"), turns)
        with pytest.raises(HeldOutOverlap, match="training side holds"):
            check_unseen(session, _persona("gen-leaky"), turns)
        files["gen-leaky"].unlink()  # the file is gone: nothing is known any more
        check_unseen(session, _persona("gen-leaky"), turns)
