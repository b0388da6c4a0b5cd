"""Coverage, the option-mass floor, alpha/omega, test-retest and framing SD: table and property tests."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from big5core.traits import Trait
from evaluator.administer import Response, render_item, run_plan, score
from evaluator.inventories import InventoryItem, get_builtin
from evaluator.schemas import AssessRequest
from evaluator.scoring import (
    DEFAULT_MIN_OPTION_MASS,
    Coverage,
    answer_from_options,
    cronbach_alpha,
    format_score,
    framing_sd,
    icc_agreement,
    mcdonald_omega,
    reliability,
    retest,
    trait_coverage,
)

UNIFORM = [0.2] * 5


# --- the option-mass floor ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probs", "mass", "floor", "value", "error"),
    [
        ([0, 0, 1, 0, 0], 0.5, 0.01, 3.0, None),
        ([1, 0, 0, 0, 0], 0.01, 0.01, 1.0, None),  # at the floor: answered
        (UNIFORM, 0.0007, 0.01, None, "no answer: option mass 0.0007 < floor 0.01"),
        (UNIFORM, 0.0007, 0.0, 3.0, None),  # floor off
        (None, 0.0, 0.01, None, "no answer: option mass 0 (no probability on any option)"),
    ],
)
def test_floor_table(
    probs: list[float] | None, mass: float, floor: float, value: float | None, error: str | None
) -> None:
    assert answer_from_options(probs, mass, floor) == (value, error)


def test_default_floor_is_documented_and_sane() -> None:
    assert 0 < DEFAULT_MIN_OPTION_MASS < 0.5
    assert AssessRequest.model_fields["min_option_mass"].default == DEFAULT_MIN_OPTION_MASS
    assert str(DEFAULT_MIN_OPTION_MASS) in (AssessRequest.model_fields["min_option_mass"].description or "")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.001, 1), min_size=5, max_size=5),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_floor_property(weights: list[float], mass: float, floor: float) -> None:
    probs = [w / sum(weights) for w in weights]
    value, error = answer_from_options(probs, mass, floor)
    if mass >= floor and mass > 0:
        assert error is None and value is not None and 1 <= value <= 5
    else:
        assert value is None and error is not None and error.startswith("no answer: option mass")


# --- coverage -------------------------------------------------------------------------------------


def _item(id_: str, trait: str, keyed: str = "+") -> InventoryItem:
    return InventoryItem.model_validate({"id": id_, "text": f"S {id_}.", "trait": trait, "facet": None, "keyed": keyed})


ITEMS = [_item("1", "E"), _item("2", "E", "-"), _item("3", "N"), _item("4", "N")]


def test_trait_coverage_table() -> None:
    runs = [{"1": 4.0, "2": None, "3": 2.0, "4": 3.0}, {"1": None, "2": None, "3": 5.0}]
    cov = trait_coverage(ITEMS, runs)
    assert cov[Trait.EXTRAVERSION] == Coverage(answered=1, total=4)
    assert cov[Trait.NEUROTICISM] == Coverage(answered=3, total=4)
    assert cov[Trait.EXTRAVERSION].share == 0.25 and not cov[Trait.EXTRAVERSION].scored(0.5)
    assert cov[Trait.NEUROTICISM].scored(0.5)
    assert Coverage(0, 0).share is None and not Coverage(0, 0).scored(0.0)


@pytest.mark.parametrize(
    ("mean", "coverage", "text"),
    [(3.456, 1.0, "3.46"), (3.0, 0.03, "n/a (coverage 3%)"), (None, None, "-"), (2.0, 0.5, "2.00")],
)
def test_format_score(mean: float | None, coverage: float | None, text: str) -> None:
    assert format_score(mean, coverage) == text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.integers(1, 5)), min_size=4, max_size=4), min_size=1, max_size=6))
def test_coverage_counts_exactly_the_answered_pairs(rows: list[list[int | None]]) -> None:
    runs = [{str(i + 1): (None if v is None else float(v)) for i, v in enumerate(row)} for row in rows]
    cov = trait_coverage(ITEMS, runs)
    answered = sum(v is not None for row in rows for v in row)
    assert sum(c.answered for c in cov.values()) == answered
    assert all(c.total == 2 * len(rows) and 0 <= (c.share or 0) <= 1 for c in cov.values())


def _responses(values: dict[tuple[int, str], float | None]) -> list[Response]:
    return [
        Response(run=run, position=pos, item_id=i, variant=run, value=v, parse_error=None if v else "no answer")
        for pos, ((run, i), v) in enumerate(sorted(values.items()))
    ]


def test_score_gates_traits_below_the_coverage_threshold() -> None:
    inventory = get_builtin("bfi44")
    ext = [i.id for i in inventory.items if i.trait is Trait.EXTRAVERSION]
    values: dict[tuple[int, str], float | None] = {}
    for run in range(2):
        for item in inventory.items:
            values[(run, item.id)] = None if item.trait is Trait.EXTRAVERSION and item.id != ext[0] else 4.0
    scores = score(inventory, _responses(values), 2, min_coverage=0.5)
    e = scores.traits["extraversion"]
    assert e["mean"] is None and e["sd"] is None and e["z"] is None
    assert e["coverage"] == pytest.approx(1 / len(ext)) and e["n_answered"] == 2 and e["n_asked"] == 2 * len(ext)
    assert scores.traits["openness"]["mean"] is not None and scores.traits["openness"]["coverage"] == 1.0
    assert scores.summary["coverage_by_trait"]["extraversion"] == pytest.approx(1 / len(ext))
    assert scores.summary["n_failed"] == 2 * (len(ext) - 1)
    # the same answers with the threshold off score extraversion from its one answered item
    assert score(inventory, _responses(values), 2, min_coverage=0.0).traits["extraversion"]["mean"] is not None


# --- reliability: alpha and omega -----------------------------------------------------------------

KNOWN = np.array(
    [[1, 3, 2, 4], [2, 3, 3, 5], [3, 4, 4, 4], [4, 5, 4, 5], [5, 5, 5, 5], [2, 2, 3, 3], [3, 3, 2, 4]], dtype=float
)


def test_alpha_matches_pingouin_on_a_known_matrix() -> None:
    expected = pg.cronbach_alpha(data=pd.DataFrame(KNOWN))[0]
    assert cronbach_alpha(KNOWN) == pytest.approx(expected, abs=1e-12)
    assert reliability(KNOWN).alpha == pytest.approx(expected, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(3, 6).flatmap(
        lambda k: st.lists(st.lists(st.integers(1, 5), min_size=k, max_size=k), min_size=k, max_size=12)
    )
)
def test_alpha_matches_pingouin_property(rows: list[list[int]]) -> None:
    data = np.asarray(rows, dtype=float)
    ours = cronbach_alpha(data)
    if np.var(data.sum(axis=1), ddof=1) == 0:
        assert ours is None
    else:
        assert ours == pytest.approx(pg.cronbach_alpha(data=pd.DataFrame(data))[0], abs=1e-9)


def _exact_one_factor(loadings: np.ndarray, n: int = 300) -> np.ndarray:
    """Data whose sample covariance is exactly the population covariance of a one-factor model."""
    k = len(loadings)
    sigma = np.outer(loadings, loadings) + np.diag(1 - loadings**2)
    x = np.random.default_rng(0).standard_normal((n, k))
    x -= x.mean(axis=0)
    x = x @ np.linalg.cholesky(np.linalg.inv(x.T @ x / n))  # sample covariance -> identity
    return x @ np.linalg.cholesky(sigma).T


@pytest.mark.parametrize("loadings", [[0.8, 0.7, 0.6, 0.5], [0.8, 0.5, 0.6], [0.6, 0.6, 0.6, 0.6, 0.6]])
def test_omega_recovers_the_population_value(loadings: list[float]) -> None:
    lam = np.asarray(loadings)
    expected = lam.sum() ** 2 / (lam.sum() ** 2 + (1 - lam**2).sum())  # McDonald (1999), standardised
    assert mcdonald_omega(_exact_one_factor(lam)) == pytest.approx(expected, abs=1e-4)


def test_omega_equals_standardised_alpha_for_equal_loadings() -> None:
    data = _exact_one_factor(np.full(5, 0.6))
    z = (data - data.mean(axis=0)) / data.std(axis=0, ddof=1)
    assert mcdonald_omega(data) == pytest.approx(cronbach_alpha(z), abs=1e-5)


@pytest.mark.parametrize(
    ("matrix", "note"),
    [
        ([[1, 2, 3], [2, 3, 4]], "fewer respondents (2) than items (3)"),
        ([[3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], "zero variance of the totals"),
        ([[1], [2], [3]], "fewer than 2 items"),
    ],
)
def test_reliability_is_none_where_undefined(matrix: list[list[float]], note: str) -> None:
    r = reliability(matrix)
    assert r.alpha is None and r.omega is None and r.note == note
    assert (r.n, r.k) == (len(matrix), len(matrix[0]))


def test_omega_is_none_for_two_items_or_a_constant_item() -> None:
    assert mcdonald_omega([[1, 2], [2, 3], [3, 5]]) is None
    constant_item = [[1, 3, 2], [2, 3, 3], [3, 3, 4], [4, 3, 5]]
    assert mcdonald_omega(constant_item) is None and reliability(constant_item).alpha is not None


# --- test-retest and framing ----------------------------------------------------------------------


def test_icc_matches_pingouin() -> None:
    long = pd.DataFrame(
        [(i, r, KNOWN[i, r]) for i in range(KNOWN.shape[0]) for r in range(KNOWN.shape[1])],
        columns=["item", "run", "value"],
    )
    table = pg.intraclass_corr(data=long, targets="item", raters="run", ratings="value").set_index("Type")
    assert icc_agreement(KNOWN) == pytest.approx(table.loc["ICC(A,1)", "ICC"], abs=1e-9)


def test_retest_identical_runs_agree_perfectly_and_undefined_cases() -> None:
    run = {"1": 1.0, "2": 4.0, "3": 2.0, "4": 5.0}
    same = retest([run, dict(run), dict(run)])
    assert same.icc == pytest.approx(1.0) and same.mean_r == pytest.approx(1.0) and same.n_items == 4
    assert retest([run]).icc is None  # one run
    assert retest([{"1": 3.0, "2": 3.0}, {"1": 3.0, "2": 3.0}]).icc is None  # no variance at all
    partial = retest([run, {**run, "3": None}])
    assert partial.n_items == 3


def test_framing_sd() -> None:
    assert framing_sd({"a": 2.0, "b": 4.0}) == pytest.approx(math.sqrt(2))
    assert framing_sd({"a": 2.0, "b": None}) is None


def test_framings_are_recorded_per_response_and_render_as_asked() -> None:
    inventory = get_builtin("ipip_neo_120")
    request = AssessRequest.model_validate(
        {"persona": {"method": "direct"}, "inventory": "ipip_neo_120", "runs": 9, "vary_options": True, "shuffle": True}
    )
    plan = run_plan(inventory, request)
    framings = {(f.variant, f.option_variant) for f, _ in plan}
    assert framings == {(i, o) for i in range(3) for o in range(3)}  # 3 instructions x 3 answer formats
    assert len({f.order for f, _ in plan}) == 9 and all(f.order != "fixed" for f, _ in plan)
    item = inventory.items[0]
    paper = render_item(inventory, item, 0, 0, "logprob")
    assert "You can only reply a single number from 1 to 5, where 1 = Very inaccurate" in paper
    assert "5 down to 1, where 5 = Very accurate" in render_item(inventory, item, 0, 2, "logprob")
    label = render_item(inventory, item, 1, 0, "label")
    assert "single number" not in label and "Very inaccurate; Moderately inaccurate;" in label
    assert item.text in label
