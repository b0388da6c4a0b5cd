"""The reasoning table: paired differences, their bootstrap CIs, McNemar, the summary row, the verdicts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluator.reasoning.report import SUMMARY, condition, mcnemar_p, reasoning_table, table_figure
from evaluator.stats import mean_of_means_ci


def unit(task: str, method: str, traits: dict[str, float], scores: list[float]) -> dict[str, object]:
    return {"task": task, "method": method, "traits": traits, "scores": {f"q{i}": s for i, s in enumerate(scores)}}


def test_condition() -> None:
    assert condition("sft", {"conscientiousness": 1.0}) == ("conscientiousness", "high")
    assert condition("prompt", {"neuroticism": -1.0, "openness": 0.0}) == ("neuroticism", "low")
    assert condition("sft", {"neuroticism": -0.5}) is None
    assert condition("sft", {"neuroticism": -1.0, "openness": 1.0}) is None
    assert condition("direct", {}) is None


def test_table_pairs_items_and_reads_the_direction() -> None:
    rng = np.random.default_rng(1)
    high = (rng.random(400) < 0.7).astype(float).tolist()
    low = (rng.random(400) < 0.4).astype(float).tolist()
    units = [
        unit("piqa", "direct", {}, [1, 0, 1, 0]),
        unit("piqa", "sft", {"conscientiousness": 1.0}, high),
        unit("piqa", "sft", {"conscientiousness": -1.0}, low),
        unit("piqa", "sft", {"neuroticism": 1.0}, low),  # N+ worse than N-: as the paper
        unit("piqa", "sft", {"neuroticism": -1.0}, high),
        unit("piqa", "sft", {"extraversion": 1.0}, high),  # E+ better: opposite to the paper
        unit("piqa", "sft", {"extraversion": -1.0}, low),
        unit("piqa", "sft", {"agreeableness": 1.0}, high),
        unit("piqa", "sft", {"agreeableness": -1.0}, high),  # no difference at all
    ]
    table = reasoning_table(units)
    cell = table.rows["sft"]["piqa"]["conscientiousness"]
    assert cell.diff == pytest.approx(np.mean(high) - np.mean(low))
    assert cell.ci is not None and cell.ci[0] < cell.diff < cell.ci[1] and cell.ci[0] > 0
    assert cell.p_mcnemar is not None and cell.p_mcnemar < 1e-6
    assert table.direct["piqa"] == 0.5 and table.direct[SUMMARY] == 0.5
    verdicts = {t: v["verdict"] for t, v in table.direction("sft").items()}
    assert verdicts == {
        "conscientiousness": "as the paper",
        "neuroticism": "as the paper",
        "extraversion": "opposite to the paper",
        "agreeableness": "no clear difference",
    }
    assert table.rows["sft"]["piqa"]["agreeableness"].ci == (0.0, 0.0)
    assert table.rows["sft"]["piqa"]["openness"].high is None
    assert "conscientiousness: as the paper" in table.format()
    assert table.to_dict()["methods"]["sft"][SUMMARY]["conscientiousness"]["ci95"] is not None


def test_summary_is_the_mean_over_tasks_and_pairs_by_item() -> None:
    units = [
        unit("a", "prompt", {"conscientiousness": 1.0}, [1, 1, 1, 1]),
        unit("a", "prompt", {"conscientiousness": -1.0}, [0, 0, 0, 0]),
        unit("b", "prompt", {"conscientiousness": 1.0}, [0, 0, 1, 1]),
        unit("b", "prompt", {"conscientiousness": -1.0}, [0, 0, 1]),  # q3 missing: not paired
        unit("b", "prompt", {"conscientiousness": -1.0}, [0, 0, 0, 0]),  # a later unit replaces it
    ]
    table = reasoning_table(units)
    assert table.rows["prompt"]["b"]["conscientiousness"].n_paired == 4
    summary = table.rows["prompt"][SUMMARY]["conscientiousness"]
    assert summary.diff == pytest.approx((1.0 + 0.5) / 2)
    assert summary.high == pytest.approx(0.75) and summary.low == pytest.approx(0.0)
    assert summary.ci is not None and summary.ci[0] <= summary.diff <= summary.ci[1]
    assert table.direct[SUMMARY] is None  # no Direct run: no Direct mean


def test_mcnemar_only_for_binary_scores() -> None:
    assert mcnemar_p(np.array([1.0, 0.0]), np.array([0.3, 1.0])) is None
    assert mcnemar_p(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 1.0
    # 10 discordant pairs all one way: two-sided exact p = 2 * 0.5**10
    assert mcnemar_p(np.ones(10), np.zeros(10)) == pytest.approx(2 * 0.5**10)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(min_value=-1, max_value=1), min_size=2, max_size=60))
def test_ci_holds_the_point_estimate(diffs: list[float]) -> None:
    ci = mean_of_means_ci([np.array(diffs)], resamples=200)
    assert ci is not None
    assert ci[0] - 1e-9 <= float(np.mean(diffs)) <= ci[1] + 1e-9


def test_figure_renders() -> None:
    units = [
        unit("piqa", "direct", {}, [1, 0]),
        unit("piqa", "sft", {"conscientiousness": 1.0}, [1, 1]),
        unit("piqa", "sft", {"conscientiousness": -1.0}, [0, 1]),
    ]
    svg = table_figure(reasoning_table(units), "svg")
    assert b"<svg" in svg and b"Conscientiousness" in svg
