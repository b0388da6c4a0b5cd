"""Table and property tests for evaluator.scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from big5core.traits import TRAITS, Trait
from evaluator.inventories import InventoryItem, NormStat, get_builtin, norms_for
from evaluator.scoring import (
    RunScores,
    correlation_matrix,
    cronbach_alpha,
    expected_value,
    frobenius_distance,
    normalise,
    parse_failure_rate,
    recode,
    score_run,
    summarise,
    z_scores,
)

EXT, NEU, OPN = Trait.EXTRAVERSION, Trait.NEUROTICISM, Trait.OPENNESS


def item(id_: str, trait: str, keyed: str, facet: str | None = None) -> InventoryItem:
    return InventoryItem.model_validate(
        {"id": id_, "text": f"Statement {id_}.", "trait": trait, "facet": facet, "keyed": keyed}
    )


SMALL = [
    item("1", "E", "+", "E1"),
    item("2", "E", "-", "E1"),
    item("3", "N", "+", "N1"),
    item("4", "N", "-", "N2"),
]

# --- recode -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "keyed", "points", "expected"),
    [
        (1, "+", 5, 1.0),
        (5, "+", 5, 5.0),
        (1, "-", 5, 5.0),
        (2, "-", 5, 4.0),
        (3, "-", 5, 3.0),
        (4.5, "-", 5, 1.5),
        (2, "-", 7, 6.0),
        (7, "-", 7, 1.0),
    ],
)
def test_recode_table(value: float, keyed: str, points: int, expected: float) -> None:
    assert recode(value, keyed, points) == expected


@pytest.mark.parametrize(("value", "keyed"), [(0, "+"), (6, "-"), (float("nan"), "+"), (3, "R"), (3, "")])
def test_recode_rejects_bad_input(value: float, keyed: str) -> None:
    with pytest.raises(ValueError):
        recode(value, keyed)


# --- score_run ----------------------------------------------------------------------------------


def test_score_run_reverse_keys_and_missing_answers() -> None:
    run = score_run(SMALL, {"1": 5, "2": 1, "3": None, "4": 2})
    # E: 5 and 6-1=5 -> 5.0; N: item 3 missing, item 4 -> 6-2 = 4.0
    assert run.traits == {EXT: 5.0, NEU: 4.0}
    assert run.facets == {"E1": 5.0, "N1": None, "N2": 4.0}
    assert (run.n_answered, run.n_missing) == (3, 1)


def test_score_run_absent_ids_count_as_missing_and_empty_trait_is_none() -> None:
    run = score_run(SMALL, {"1": 2, "2": 2})
    assert run.traits == {EXT: 3.0, NEU: None}  # (2 + (6-2)) / 2 = 3
    assert (run.n_answered, run.n_missing) == (2, 2)


def test_score_run_rejects_unknown_ids_and_out_of_range_answers() -> None:
    with pytest.raises(ValueError, match="unknown item ids"):
        score_run(SMALL, {"99": 3})
    with pytest.raises(ValueError, match="item 2"):
        score_run(SMALL, {"2": 6})


def test_score_run_bfi_all_fives_follows_standard_key() -> None:
    bfi = get_builtin("bfi44")
    run = score_run(bfi.items, {i.id: 5 for i in bfi.items})
    # Standard key: E 8 items (3 reversed), A 9 (4), C 9 (4), N 8 (3), O 10 (2); reversed 5 -> 1.
    assert run.traits[EXT] == pytest.approx((5 * 5 + 3 * 1) / 8)
    assert run.traits[Trait.AGREEABLENESS] == pytest.approx((5 * 5 + 4) / 9)
    assert run.traits[Trait.CONSCIENTIOUSNESS] == pytest.approx((5 * 5 + 4) / 9)
    assert run.traits[NEU] == pytest.approx((5 * 5 + 3) / 8)
    assert run.traits[OPN] == pytest.approx((8 * 5 + 2) / 10)
    assert list(run.traits) == list(TRAITS)


# --- summarise ----------------------------------------------------------------------------------


def test_summarise_mean_and_sample_sd() -> None:
    runs = [
        RunScores(traits={EXT: 2.0, NEU: None}, facets={"E1": 1.0}, n_answered=3, n_missing=1),
        RunScores(traits={EXT: 4.0, NEU: 3.0}, facets={"E1": 2.0}, n_answered=4, n_missing=0),
    ]
    summary = summarise(runs)
    assert summary.traits[EXT].mean == 3.0
    assert summary.traits[EXT].sd == pytest.approx(math.sqrt(2))  # ddof=1: ((1 + 1) / 1) ** 0.5
    assert summary.traits[NEU].mean == 3.0 and summary.traits[NEU].sd is None and summary.traits[NEU].n_runs == 1
    assert summary.facets["E1"].sd == pytest.approx(math.sqrt(0.5))
    assert (summary.n_runs, summary.n_answered, summary.n_missing) == (2, 7, 1)
    assert summary.parse_failure_rate == pytest.approx(1 / 8)


def test_summarise_single_run_has_no_sd_and_empty_list_fails() -> None:
    summary = summarise([RunScores(traits={EXT: 2.5}, facets={}, n_answered=1, n_missing=0)])
    assert summary.traits[EXT].mean == 2.5 and summary.traits[EXT].sd is None
    with pytest.raises(ValueError):
        summarise([])


# --- Cronbach's alpha ---------------------------------------------------------------------------


def test_cronbach_alpha_known_matrix() -> None:
    # Columns 1,2,3,4 | 2,3,4,4 | 3,3,5,4: variances (ddof=1) 5/3, 2.75/3, 2.75/3 -> sum 3.5.
    # Row totals 6, 8, 12, 12: mean 9.5, squared deviations 27, variance 9.
    # alpha = 3/2 * (1 - 3.5/9) = 11/12.
    matrix = [[1, 2, 3], [2, 3, 3], [3, 4, 5], [4, 4, 4]]
    assert cronbach_alpha(matrix) == pytest.approx(11 / 12)


def test_cronbach_alpha_parallel_and_opposed_items() -> None:
    assert cronbach_alpha([[1, 1], [2, 2], [4, 4]]) == pytest.approx(1.0)
    # Items 1,2,3 and 2,1,2: variances 1 and 1/3; totals 3,3,5 variance 4/3 -> 2 * (1 - 1) = 0.
    assert cronbach_alpha([[1, 2], [2, 1], [3, 2]]) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "matrix",
    [
        [[1, 2, 3]],  # one observation
        [[1], [2], [3]],  # one item
        [[1, 5], [5, 1], [3, 3]],  # totals constant
        [],
    ],
)
def test_cronbach_alpha_undefined_is_none(matrix: list[list[float]]) -> None:
    assert cronbach_alpha(matrix) is None


def test_cronbach_alpha_rejects_nan_and_ragged() -> None:
    with pytest.raises(ValueError, match="NaN"):
        cronbach_alpha([[1, 2], [float("nan"), 3]])
    with pytest.raises(ValueError, match="ragged"):
        cronbach_alpha([[1, 2], [3]])


# --- failure rate and z-scores ------------------------------------------------------------------


@pytest.mark.parametrize(("failed", "total", "rate"), [(0, 10, 0.0), (3, 12, 0.25), (44, 44, 1.0)])
def test_parse_failure_rate(failed: int, total: int, rate: float) -> None:
    assert parse_failure_rate(failed, total) == rate


@pytest.mark.parametrize(("failed", "total"), [(1, 0), (-1, 5), (6, 5)])
def test_parse_failure_rate_rejects_impossible_counts(failed: int, total: int) -> None:
    with pytest.raises(ValueError):
        parse_failure_rate(failed, total)


def test_z_scores_against_bfi_crowd_norms() -> None:
    norms = norms_for("bfi44")
    assert norms is not None
    # E 3.25 (0.90), N 3.32 (0.82), O 3.92 (0.66)
    z = z_scores({EXT: 4.15, NEU: 2.5, OPN: None}, norms.traits)
    assert z[EXT] == pytest.approx(1.0)
    assert z[NEU] == pytest.approx(-1.0)
    assert z[OPN] is None


def test_z_scores_facets_missing_norm_and_bad_sd() -> None:
    z = z_scores({"N1": 4.0, "X9": 3.0}, {"N1": NormStat(mean=3.0, sd=0.5)})
    assert z == {"N1": 2.0, "X9": None}

    class Broken:
        mean = 3.0
        sd = 0.0

    with pytest.raises(ValueError, match="sd"):
        z_scores({"N1": 4.0}, {"N1": Broken()})


# --- correlations -------------------------------------------------------------------------------


def _profiles(columns: dict[Trait, list[float]]) -> list[dict[Trait, float]]:
    n = len(next(iter(columns.values())))
    return [{t: columns[t][i] for t in TRAITS} for i in range(n)]


def test_correlation_matrix_known_values_and_constant_trait() -> None:
    profiles = _profiles(
        {
            Trait.OPENNESS: [1, 2, 3, 4],
            Trait.CONSCIENTIOUSNESS: [2, 4, 6, 8],  # r(O, C) = 1
            Trait.EXTRAVERSION: [4, 3, 2, 1],  # r(O, E) = -1
            Trait.AGREEABLENESS: [1, 2, 2, 1],  # centred (-.5,.5,.5,-.5) . (-1.5,-.5,.5,1.5) = 0
            Trait.NEUROTICISM: [3, 3, 3, 3],  # constant -> NaN row and column
        }
    )
    corr = correlation_matrix(profiles)
    assert corr.shape == (5, 5)
    assert corr[0, 1] == pytest.approx(1.0) and corr[0, 2] == pytest.approx(-1.0)
    assert corr[0, 3] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.isnan(corr[4, :])) and np.all(np.isnan(corr[:, 4]))
    assert np.allclose(np.diag(corr)[:4], 1.0)
    assert np.allclose(corr[:4, :4], corr[:4, :4].T)


def test_correlation_matrix_input_errors() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        correlation_matrix([{t: 3.0 for t in TRAITS}])
    with pytest.raises(ValueError, match=r"profiles\[1\] lacks scores for N"):
        correlation_matrix([{t: 3.0 for t in TRAITS}, {t: 3.0 for t in TRAITS if t is not NEU}])


def test_frobenius_distance() -> None:
    assert frobenius_distance(np.eye(5), np.zeros((5, 5))) == pytest.approx(math.sqrt(5))
    assert frobenius_distance([[1, 0.5], [0.5, 1]], [[1, 0.2], [0.2, 1]]) == pytest.approx(math.sqrt(0.18))
    with pytest.raises(ValueError, match=r"a has NaN at \(4, 4\)"):
        frobenius_distance(np.diag([1, 1, 1, 1, np.nan]), np.eye(5))
    with pytest.raises(ValueError, match="same shape"):
        frobenius_distance(np.eye(5), np.eye(4))


# --- option probabilities -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probs", "expected"),
    [
        ([0, 0, 1, 0, 0], 3.0),
        ([1, 0, 0, 0, 0], 1.0),
        ([2, 2, 0, 0, 0], 1.5),  # not normalised: [0.5, 0.5, 0, 0, 0]
        ([0.1, 0.2, 0.3, 0.2, 0.2], 3.2),  # 0.1 + 0.4 + 0.9 + 0.8 + 1.0
        ([0.25, 0.25], 1.5),
    ],
)
def test_expected_value_table(probs: list[float], expected: float) -> None:
    assert expected_value(probs) == pytest.approx(expected)


def test_normalise_and_its_errors() -> None:
    assert normalise([1, 3]) == [0.25, 0.75]
    for bad in ([], [0, 0], [-0.1, 1], [float("nan"), 1]):
        with pytest.raises(ValueError):
            normalise(bad)


# --- properties ---------------------------------------------------------------------------------

ITEM_SPECS = st.lists(
    st.tuples(st.sampled_from([t.code for t in TRAITS]), st.sampled_from(["+", "-"]), st.integers(1, 3)),
    min_size=1,
    max_size=25,
)


def _items(specs: list[tuple[str, str, int]]) -> list[InventoryItem]:
    return [item(str(i), code, keyed, f"{code}{facet}") for i, (code, keyed, facet) in enumerate(specs)]


@settings(max_examples=60, deadline=None)
@given(specs=ITEM_SPECS, points=st.integers(2, 11), data=st.data())
def test_scores_stay_within_scale(specs: list[tuple[str, str, int]], points: int, data: st.DataObject) -> None:
    items = _items(specs)
    answer = st.none() | st.floats(1, points, allow_nan=False)
    answers = {i.id: data.draw(answer) for i in items}
    run = score_run(items, answers, points)
    assert run.n_answered + run.n_missing == len(items)
    for score in [*run.traits.values(), *run.facets.values()]:
        assert score is None or 1 - 1e-9 <= score <= points + 1e-9


@settings(max_examples=60, deadline=None)
@given(specs=ITEM_SPECS, data=st.data())
def test_reversing_answers_mirrors_scores_around_midpoint(
    specs: list[tuple[str, str, int]], data: st.DataObject
) -> None:
    items = _items(specs)
    answers = {i.id: data.draw(st.none() | st.integers(1, 5)) for i in items}
    mirrored = {k: (None if v is None else 6 - v) for k, v in answers.items()}
    original, reversed_ = score_run(items, answers), score_run(items, mirrored)
    for trait, score in original.traits.items():
        other = reversed_.traits[trait]
        if score is None:
            assert other is None
        else:
            assert other is not None and other == pytest.approx(6 - score)  # mirrored around 3


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=5, max_size=5).filter(lambda p: sum(p) > 0))
def test_expected_value_within_scale(probs: list[float]) -> None:
    assert 1.0 <= expected_value(probs) <= 5.0
    assert sum(normalise(probs)) == pytest.approx(1.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(1, 5), min_size=3, max_size=3), min_size=2, max_size=12))
def test_cronbach_alpha_never_exceeds_one(matrix: list[list[int]]) -> None:
    alpha = cronbach_alpha(matrix)
    assert alpha is None or alpha <= 1.0 + 1e-9


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(1, 5), min_size=5, max_size=5), min_size=3, max_size=15))
def test_correlation_matrix_matches_numpy(rows: list[list[int]]) -> None:
    data = np.asarray(rows, dtype=float)
    corr = correlation_matrix([dict(zip(TRAITS, row, strict=True)) for row in rows])
    constant = np.ptp(data, axis=0) == 0
    expected = np.corrcoef(data[:, ~constant], rowvar=False) if (~constant).sum() > 1 else None
    assert np.all(np.isnan(corr[constant, :])) and np.all(np.isnan(corr[:, constant]))
    if expected is not None:
        assert np.allclose(corr[np.ix_(~constant, ~constant)], expected)
