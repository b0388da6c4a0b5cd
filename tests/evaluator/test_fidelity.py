"""Fidelity statistics on planted answers: known gaps, shifts and correlations come back out."""

from __future__ import annotations

import numpy as np
import pytest

from big5core.traits import TRAITS, Trait
from evaluator.fidelity import Condition, analyse, gap_with_ci, method_alpha, off_target_shift

ITEMS = {t: [f"{t.code}{i}" for i in range(8)] for t in TRAITS}
IDENTITY = np.eye(5).tolist()


def runs_for(scores: dict[Trait, float], n_runs: int = 3, noise: float = 0.0, seed: int = 0) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    return [
        {item: float(np.clip(scores[t] + rng.normal(0, noise), 1, 5)) for t in TRAITS for item in ITEMS[t]}
        for _ in range(n_runs)
    ]


def test_gap_is_exact_for_constant_answers_and_ci_collapses() -> None:
    high = runs_for(dict.fromkeys(TRAITS, 4.5))
    low = runs_for(dict.fromkeys(TRAITS, 2.0))
    gap = gap_with_ci(high, low, ITEMS[Trait.OPENNESS], n_boot=500)
    assert gap.gap == pytest.approx(2.5)
    assert gap.ci_low == pytest.approx(2.5) and gap.ci_high == pytest.approx(2.5)
    assert gap.excludes_zero and gap.n_items == 8


def test_gap_ci_covers_zero_when_there_is_no_effect() -> None:
    high = runs_for(dict.fromkeys(TRAITS, 3.0), noise=0.8, seed=1)
    low = runs_for(dict.fromkeys(TRAITS, 3.0), noise=0.8, seed=2)
    gap = gap_with_ci(high, low, ITEMS[Trait.OPENNESS], n_boot=2000)
    assert gap.ci_low < 0 < gap.ci_high
    assert not gap.excludes_zero


def test_gap_needs_items_on_both_sides() -> None:
    with pytest.raises(ValueError, match="at least 2 items"):
        gap_with_ci([{"x": 1.0}], [{"y": 2.0}], ["x", "y"])


def test_off_target_shift_ignores_the_target() -> None:
    direct = dict.fromkeys(TRAITS, 3.0)
    induced = {**direct, Trait.OPENNESS: 5.0, Trait.EXTRAVERSION: 4.0}
    assert off_target_shift(induced, direct, Trait.OPENNESS) == pytest.approx(0.25)  # only E moved, by 1


def test_method_alpha_is_high_for_consistent_items_and_low_for_noise() -> None:
    consistent = [
        Condition("sft", Trait.OPENNESS, lv, runs_for(dict.fromkeys(TRAITS, s)))
        for lv, s in (("high", 4.8), ("low", 1.5))
    ] + [Condition("sft", Trait.NEUROTICISM, "high", runs_for(dict.fromkeys(TRAITS, 3.1)))]
    assert method_alpha(consistent, ITEMS[Trait.OPENNESS]) == pytest.approx(1.0)
    rng = np.random.default_rng(3)
    noisy = [
        Condition("sft", None, None, [{i: float(rng.integers(1, 6)) for i in ITEMS[Trait.OPENNESS]} for _ in range(40)])
    ]
    alpha = method_alpha(noisy, ITEMS[Trait.OPENNESS])
    assert alpha is not None and alpha < 0.5


def test_analyse_recovers_planted_effects() -> None:
    direct = dict.fromkeys(TRAITS, 3.0)
    conditions = [Condition("direct", None, None, runs_for(direct))]
    for trait in TRAITS:
        for level, value in (("high", 4.6), ("low", 1.8)):
            conditions.append(Condition("sft", trait, level, runs_for({**direct, trait: value}, noise=0.05, seed=7)))
            # the prompt method moves its target only half as far, and drags neuroticism along
            prompt = {**direct, Trait.NEUROTICISM: 3.5, trait: 3.0 + (value - 3.0) / 2}
            conditions.append(Condition("prompt", trait, level, runs_for(prompt)))
    found_direct, results = analyse(conditions, ITEMS, IDENTITY, n_boot=500)
    assert found_direct is not None and found_direct[Trait.AGREEABLENESS] == pytest.approx(3.0)
    for trait in TRAITS:
        assert results["sft"].gaps[trait].gap == pytest.approx(2.8, abs=0.05)
        assert results["sft"].gaps[trait].excludes_zero
        assert results["prompt"].gaps[trait].gap == pytest.approx(1.4, abs=1e-9)
        assert results["sft"].off_target[trait] < 0.05
    assert results["prompt"].off_target[Trait.OPENNESS] == pytest.approx(0.125)  # N moved 0.5 of 4 traits
    assert results["sft"].correlation_distance is not None
    # constant neuroticism except when it is the target: prompt's matrix is defined as well
    assert results["prompt"].correlation_distance is not None


def test_correlation_distance_is_reported_undefined_not_invented() -> None:
    direct = dict.fromkeys(TRAITS, 3.0)
    conditions = [
        Condition("sft", Trait.OPENNESS, lv, runs_for({**direct, Trait.OPENNESS: v}))
        for lv, v in (("high", 5), ("low", 1))
    ]
    _, results = analyse(conditions, ITEMS, IDENTITY, n_boot=100)
    assert results["sft"].correlation_distance is None
    assert results["sft"].correlation_note and "NaN" in results["sft"].correlation_note
