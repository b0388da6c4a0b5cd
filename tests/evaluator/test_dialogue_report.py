"""Dialogue report statistics: paired gaps, dose-response, 2x2 mixtures (pure functions, tables)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evaluator.dialogue_report import dose_response, item_scores, mixture, paired_gap
from evaluator.stats import bootstrap_ci


def scores(values: list[float], trait: str = "extraversion") -> dict[str, dict[str, float]]:
    return {f"i{k}": {trait: v} for k, v in enumerate(values)}


def test_paired_gap_table() -> None:
    high = scores([0.9, 0.8, 0.7, 0.6])
    low = scores([0.1, 0.2, 0.3, 0.4])
    gap = paired_gap(high, low, "extraversion", n_boot=2000)
    assert gap.gap == pytest.approx(0.5)
    assert (gap.high, gap.low, gap.n) == (pytest.approx(0.75), pytest.approx(0.25), 4)
    assert gap.ci is not None and gap.ci[0] > 0 and gap.excludes_zero
    # only the items both personas answered are paired
    partial = paired_gap(high, {"i0": {"extraversion": 0.5}}, "extraversion")
    assert partial.n == 1 and partial.gap == pytest.approx(0.4)
    assert paired_gap(high, {}, "extraversion").gap is None


def test_a_null_gap_has_a_ci_around_zero() -> None:
    same = scores([0.5, 0.6, 0.4, 0.5, 0.55, 0.45])
    shifted = scores([0.6, 0.5, 0.5, 0.4, 0.45, 0.55])
    gap = paired_gap(same, shifted, "extraversion")
    assert gap.ci is not None and gap.ci[0] < 0 < gap.ci[1] and not gap.excludes_zero


@given(st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=30))
def test_bootstrap_ci_contains_the_mean(values: list[float]) -> None:
    low, high = bootstrap_ci(values, resamples=200)
    mean = sum(values) / len(values)
    assert low - 1e-9 <= mean <= high + 1e-9


def test_dose_response_monotone_and_not() -> None:
    by_level = {
        -1.0: scores([0.1, 0.2, 0.15]),
        -0.5: scores([0.3, 0.25, 0.35]),
        0.0: scores([0.5, 0.45, 0.5]),
        0.5: scores([0.6, 0.7, 0.65]),
        1.0: scores([0.9, 0.85, 0.8]),
    }
    curve = dose_response("extraversion", by_level)
    assert curve.strictly_increasing and curve.level_spearman == pytest.approx(1.0)
    assert curve.item_spearman is not None and curve.item_spearman > 0.9
    flat = dose_response("extraversion", {**by_level, 0.5: scores([0.4, 0.4, 0.4])})
    assert not flat.strictly_increasing and flat.level_spearman is not None and flat.level_spearman < 1.0


def test_mixture_separates_own_and_cross_effects() -> None:
    def cell(e: float, a: float) -> dict[str, dict[str, float]]:
        return {"i0": {"extraversion": e, "agreeableness": a}, "i1": {"extraversion": e, "agreeableness": a}}

    cells = {(1, 1): cell(0.8, 0.9), (1, -1): cell(0.8, 0.1), (-1, 1): cell(0.2, 0.9), (-1, -1): cell(0.2, 0.1)}
    mix = mixture("extraversion", "agreeableness", cells)
    assert mix.own == {"extraversion": pytest.approx(0.6), "agreeableness": pytest.approx(0.8)}
    assert mix.cross == {
        "extraversion->agreeableness": pytest.approx(0.0),
        "agreeableness->extraversion": pytest.approx(0.0),
    }
    assert mix.meets()
    leaky = {**cells, (1, 1): cell(0.8, 1.0), (1, -1): cell(0.8, 0.5)}
    assert not mixture("extraversion", "agreeableness", leaky).meets()


def test_item_scores_take_answered_first_run_replies() -> None:
    class R:
        def __init__(self, item_id: str, run: int, judge: dict[str, float] | None) -> None:
            self.item_id, self.run, self.judge_scores = item_id, run, judge

    out = item_scores([R("a", 0, {"openness": 0.7}), R("b", 0, None), R("a", 1, {"openness": 0.1})])
    assert out == {"a": {"openness": 0.7}}
