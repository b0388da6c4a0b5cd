"""Reply quality: repetition, collapse, relevance, perplexity summaries, the method rows and validity."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evaluator import quality
from evaluator.quality_report import (
    Replies,
    convergent_validity,
    format_rows,
    method_quality,
    pearson_ci,
    quality_targets,
)

LOOPING = "I'm not. I'm not. I'm not. I'm not. I'm not. I'm not."
REAL = "Oh, I'd love to see the new exhibit with you! What time works best for you on Saturday?"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0.0),
        ("two words", 0.0),
        ("a b c", 0.0),
        ("a b c a b c", 1 / 4),  # 3-grams: abc bca cab abc -> one of four repeats
        (REAL, 0.0),
    ],
)
def test_repetition_table(text: str, expected: float) -> None:
    assert quality.repetition(text) == pytest.approx(expected)


def test_a_looping_reply_fails_the_repetition_bound() -> None:
    assert quality.repetition(LOOPING) > 0.5
    assert quality.repetition(REAL) <= 0.10


@given(st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=40))
def test_repetition_is_a_share(tokens: list[str]) -> None:
    value = quality.repetition(" ".join(tokens))
    assert 0.0 <= value < 1.0
    if len(set(quality.ngrams(tokens, 3))) == len(quality.ngrams(tokens, 3)):
        assert value == 0.0


def test_openings_and_a_collapsed_set() -> None:
    assert quality.opening("Thanks, but -- but also, I think so.") == "thanks but but"
    collapsed = [f"Thanks, but but also, {x}" for x in ("yes", "no", "maybe", "later")] + ["Sure thing, friend."]
    share, top = quality.shared_opening(collapsed)
    assert share == pytest.approx(0.8) and top == "thanks but but"
    varied = ["Sure, let's go.", "No way, I'm tired.", "Maybe later?", "What a fun idea!"]
    assert quality.shared_opening(varied)[0] == pytest.approx(0.25)
    assert quality.shared_opening([]) == (None, None)
    assert quality.distinct_n(collapsed, 2) < quality.distinct_n(varied, 2)
    assert quality.distinct_n(["one"], 2) is None


def test_relevance_rewards_a_reply_that_takes_up_the_turn() -> None:
    model = quality.Relevance(
        ["Do you want to go hiking at the lake this weekend?", "I baked bread today.", REAL, "The exam is tomorrow."]
    )
    turn = "Do you want to go hiking at the lake this weekend?"
    on_topic, off_topic, empty = model.scores(
        [turn] * 3, ["Hiking at the lake sounds great this weekend!", "I baked bread today.", ""]
    )
    assert on_topic > 0.3 and off_topic == 0.0 and empty == 0.0
    with pytest.raises(ValueError, match="turns but"):
        model.scores([turn], [])


def test_the_bundled_source_has_a_relevance_model() -> None:
    from big5core.dataset import BUNDLED_REAL

    model = quality.relevance_for(BUNDLED_REAL)
    assert model is quality.relevance_for(BUNDLED_REAL)  # fitted once
    (score,) = model.scores(["Can you help me move the couch?"], ["Sure, I can help you move the couch."])
    assert 0.2 < score <= 1.0


def test_summary_of_one_condition() -> None:
    texts = [LOOPING, REAL, REAL]
    rows = [
        quality.ReplyQuality(quality.repetition(t), quality.opening(t), 0.1, p, len(quality.words(t)))
        for t, p in zip(texts, (100.0, 10.0, 1000.0), strict=True)
    ]
    summary = quality.summarise(rows, texts)
    assert summary["n"] == 3
    assert summary["repetition"]["mean"] == pytest.approx((quality.repetition(LOOPING)) / 3)
    assert summary["perplexity"]["mean"] == pytest.approx(100.0)  # geometric mean of 100, 10, 1000
    assert summary["shared_opening"] == pytest.approx(2 / 3)
    low, high = summary["repetition"]["ci95"]
    assert low <= summary["repetition"]["mean"] <= high


def _replies(texts: list[str], relevance: float = 0.1) -> Replies:
    return Replies(
        list(texts),
        [{"repetition": quality.repetition(t), "opening": quality.opening(t), "relevance": relevance,
          "perplexity": 20.0, "n_words": len(quality.words(t))} for t in texts],
    )  # fmt: skip


def test_method_rows_and_targets_catch_loops_collapse_deafness_and_silence() -> None:
    varied = ["Sure, let's go to the lake.", "No, I am tired tonight.", "Maybe after lunch?", "What a fun plan!"]
    reference = {"openness|high": _replies(varied, 0.10), "openness|low": _replies(varied, 0.10)}
    replies = {
        "direct": _replies(varied, 0.09),
        "good|openness|high": _replies(varied, 0.09),
        "good|openness|low": _replies(varied, 0.09),
        "bad|openness|high": _replies([LOOPING] * 4, 0.01),
        "bad|openness|low": _replies(varied, 0.01),
    }
    coverage = {"good|openness|high": 1.0, "good|openness|low": 0.9, "bad|openness|high": 0.0, "bad|openness|low": 1}
    gaps = {"Good": {"openness": 0.5}, "Bad": {"openness": 0.7}}
    rows = method_quality(replies, [("good", "Good"), ("bad", "Bad")], reference, coverage, gaps)
    assert [r.title for r in rows] == ["real replies", "Direct", "Good", "Bad"]
    by = {r.title: r for r in rows}
    assert by["real replies"].relevance_ratio == 1.0
    assert by["Bad"].worst_opening == 1.0 and by["Bad"].worst_opening_cell == "bad|openness|high"
    assert by["Bad"].gap_mean == pytest.approx(0.7) and by["Bad"].coverage_min == 0.0
    targets = quality_targets(rows)
    assert all(ok for ok, _ in targets["Good"].values()), targets["Good"]
    bad = targets["Bad"]
    assert not bad["repetition <= 0.10"][0] and not bad["shared opening <= 25%"][0]
    assert not bad["relevance >= 0.8x real"][0] and not bad["BFI coverage >= 0.8"][0]
    text = format_rows(rows)
    assert "real replies" in text and "i'm not i'm" in text


def test_pearson_ci_and_convergent_validity() -> None:
    r, ci = pearson_ci([1, 2, 3, 4, 5, 6], [1.1, 1.9, 3.2, 3.9, 5.1, 6.0])
    assert r is not None and r > 0.99 and ci is not None and ci[0] < r < ci[1] <= 1.0
    assert pearson_ci([1, 2, 3], [1, 2, 3]) == (None, None)
    assert pearson_ci([1, 1, 1, 1], [1, 2, 3, 4]) == (None, None)
    questionnaire = {f"p{i}": {"openness": float(i), "agreeableness": None} for i in range(6)}
    judged = {f"p{i}": {"openness": 0.1 * i, "agreeableness": 0.5} for i in range(6)}
    (o, a) = convergent_validity(questionnaire, judged, ["openness", "agreeableness"])
    assert o.n == 6 and o.r == pytest.approx(1.0) and a.n == 0 and a.r is None


def test_perplexity_is_the_exponent_of_the_mean_token_nll() -> None:
    import asyncio
    from dataclasses import dataclass

    @dataclass
    class Score:
        logprob: float
        n_tokens: int

    class FakeEngine:
        """FAKE engine (named as one): planted log-probs, to check the arithmetic only."""

        def render(self, messages: list[dict[str, str]]) -> str:
            return messages[-1]["content"]

        async def continuation_logprobs(self, prompt: str, continuations: list[str], lora: object = None) -> list:
            assert lora is None  # always the base model
            return [Score(logprob=-2.0 * len(c.split()), n_tokens=len(c.split())) for c in continuations]

    ppl = asyncio.run(quality.base_perplexities(FakeEngine(), ["hi", "hi"], ["a b c", " "]))
    assert ppl[0] == pytest.approx(math.exp(2.0)) and ppl[1] is None
