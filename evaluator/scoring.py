"""Pure scoring functions for questionnaire answers: no I/O, no model calls.

Conventions (shared by BFI-44 and the IPIP-NEO instruments): answers are coded 1..points, a
reverse-keyed item is recoded as ``points + 1 - x``, and a trait or facet score is the mean of its
answered items after recoding. Missing answers (parse failures) are skipped and counted, never
silently replaced by the midpoint as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from big5core.traits import TRAITS, Trait

K = TypeVar("K", bound=Hashable)

_ZERO_VARIANCE = 1e-12


class ScoredItem(Protocol):
    """What scoring needs from an item; ``evaluator.inventories.InventoryItem`` satisfies it."""

    @property
    def id(self) -> str: ...
    @property
    def trait(self) -> Trait: ...
    @property
    def facet(self) -> str | None: ...
    @property
    def keyed(self) -> str: ...


class MeanSD(Protocol):
    """A human norm; ``evaluator.inventories.NormStat`` satisfies it."""

    @property
    def mean(self) -> float: ...
    @property
    def sd(self) -> float: ...


@dataclass(frozen=True)
class RunScores:
    """Scores of one administration of an inventory.

    ``traits`` has an entry for every trait the items measure, None when none of its items was
    answered; ``facets`` likewise for every facet code.
    """

    traits: dict[Trait, float | None]
    facets: dict[str, float | None]
    n_answered: int
    n_missing: int


@dataclass(frozen=True)
class ScoreSummary:
    """Mean and spread of one score across runs; ``sd`` is None for fewer than two scored runs."""

    mean: float | None
    sd: float | None
    n_runs: int


@dataclass(frozen=True)
class Summary:
    """Per-trait and per-facet summaries across runs."""

    traits: dict[Trait, ScoreSummary]
    facets: dict[str, ScoreSummary]
    n_runs: int
    n_answered: int
    n_missing: int
    parse_failure_rate: float


def recode(value: float, keyed: str, points: int = 5) -> float:
    """Return the trait-direction score of an answer: ``x`` for "+", ``points + 1 - x`` for "-"."""
    if keyed not in ("+", "-"):
        raise ValueError(f"keyed must be '+' or '-', got {keyed!r}")
    if not (math.isfinite(value) and 1 <= value <= points):
        raise ValueError(f"answer {value!r} outside the scale 1..{points}")
    return float(value) if keyed == "+" else float(points + 1 - value)


def recoded_answers(items: Sequence[ScoredItem], answers: Mapping[str, float | None], points: int) -> dict[str, float]:
    """Recoded answers of the answered items; rejects answers for ids the items do not contain."""
    ids = {item.id for item in items}
    unknown = [key for key in answers if key not in ids]
    if unknown:
        raise ValueError(f"answers for unknown item ids: {sorted(unknown)[:10]}")
    out: dict[str, float] = {}
    for item in items:
        value = answers.get(item.id)
        if value is not None:
            try:
                out[item.id] = recode(value, item.keyed, points)
            except ValueError as exc:
                raise ValueError(f"item {item.id}: {exc}") from None
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_run(items: Sequence[ScoredItem], answers: Mapping[str, float | None], points: int = 5) -> RunScores:
    """Trait and facet means of one run; ``answers`` maps item id to the raw answer or None."""
    recoded = recoded_answers(items, answers, points)
    by_trait: dict[Trait, list[float]] = {}
    by_facet: dict[str, list[float]] = {}
    for item in items:
        trait_values = by_trait.setdefault(item.trait, [])
        facet_values = by_facet.setdefault(item.facet, []) if item.facet is not None else None
        if item.id in recoded:
            trait_values.append(recoded[item.id])
            if facet_values is not None:
                facet_values.append(recoded[item.id])
    return RunScores(
        traits={t: _mean(by_trait[t]) for t in TRAITS if t in by_trait},
        facets={code: _mean(values) for code, values in by_facet.items()},
        n_answered=len(recoded),
        n_missing=len(items) - len(recoded),
    )


def _summarise_scores(values: list[float | None]) -> ScoreSummary:
    present = [v for v in values if v is not None]
    if not present:
        return ScoreSummary(mean=None, sd=None, n_runs=0)
    sd = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return ScoreSummary(mean=sum(present) / len(present), sd=sd, n_runs=len(present))


def summarise(runs: Sequence[RunScores]) -> Summary:
    """Mean and SD (ddof=1) across runs of each trait and facet; runs where a score is None are skipped."""
    if not runs:
        raise ValueError("summarise needs at least one run")
    traits = [t for t in TRAITS if any(t in run.traits for run in runs)]
    facets = list(dict.fromkeys(code for run in runs for code in run.facets))
    n_answered = sum(run.n_answered for run in runs)
    n_missing = sum(run.n_missing for run in runs)
    return Summary(
        traits={t: _summarise_scores([run.traits.get(t) for run in runs]) for t in traits},
        facets={code: _summarise_scores([run.facets.get(code) for run in runs]) for code in facets},
        n_runs=len(runs),
        n_answered=n_answered,
        n_missing=n_missing,
        parse_failure_rate=parse_failure_rate(n_missing, n_answered + n_missing) if n_answered + n_missing else 0.0,
    )


def cronbach_alpha(matrix: Sequence[Sequence[float]] | npt.NDArray[np.float64]) -> float | None:
    """Cronbach's alpha of a rows-are-observations, columns-are-items matrix.

    alpha = k / (k - 1) * (1 - sum of item variances / variance of row totals), variances with
    ddof=1. None when undefined: fewer than 2 items, fewer than 2 observations, or zero variance of
    the totals. Missing values are not allowed (drop incomplete rows first): NaN raises ValueError.
    """
    rows = [list(row) for row in matrix]
    if len(rows) < 2:
        return None
    widths = {len(row) for row in rows}
    if len(widths) != 1:
        raise ValueError(f"ragged matrix: row lengths {sorted(widths)}")
    data = np.asarray(rows, dtype=float)
    if not np.all(np.isfinite(data)):
        raise ValueError("matrix contains NaN or infinite values; drop incomplete observations first")
    k = int(data.shape[1])
    if k < 2:
        return None
    total_variance = float(np.var(data.sum(axis=1), ddof=1))
    if total_variance <= _ZERO_VARIANCE:
        return None
    item_variances = float(np.var(data, axis=0, ddof=1).sum())
    return k / (k - 1) * (1.0 - item_variances / total_variance)


def parse_failure_rate(n_failed: int, n_total: int) -> float:
    """Share of answers that could not be parsed; raises ValueError on impossible counts."""
    if n_total <= 0:
        raise ValueError(f"n_total must be positive, got {n_total}")
    if not 0 <= n_failed <= n_total:
        raise ValueError(f"n_failed must lie in 0..{n_total}, got {n_failed}")
    return n_failed / n_total


def z_scores(trait_means: Mapping[K, float | None], norms: Mapping[K, MeanSD]) -> dict[K, float | None]:
    """(score - human mean) / human SD for every key of ``trait_means`` (traits or facet codes).

    A key whose score is None or that has no norm maps to None.
    """
    out: dict[K, float | None] = {}
    for key, value in trait_means.items():
        norm = norms.get(key)
        if value is None or norm is None:
            out[key] = None
            continue
        if not norm.sd > 0:
            raise ValueError(f"norm for {key!r} has non-positive sd {norm.sd!r}")
        out[key] = (value - norm.mean) / norm.sd
    return out


def correlation_matrix(profiles: Sequence[Mapping[Trait, float]]) -> npt.NDArray[np.float64]:
    """5x5 Pearson correlations of trait scores across profiles, rows and columns in OCEAN order.

    Each profile (e.g. the scores of one induced condition) must score all five traits. A trait
    whose score is the same in every profile has undefined correlations: its row and column,
    diagonal included, are NaN.
    """
    if len(profiles) < 2:
        raise ValueError(f"need at least 2 profiles to correlate, got {len(profiles)}")
    rows = []
    for index, profile in enumerate(profiles):
        missing = [t.code for t in TRAITS if profile.get(t) is None]
        if missing:
            raise ValueError(f"profiles[{index}] lacks scores for {', '.join(missing)}")
        rows.append([float(profile[t]) for t in TRAITS])
    data = np.asarray(rows, dtype=float)
    if not np.all(np.isfinite(data)):
        raise ValueError("profiles contain NaN or infinite scores")
    constant = np.ptp(data, axis=0) == 0
    centred = data - data.mean(axis=0)
    norms = np.sqrt((centred**2).sum(axis=0))
    norms[constant] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (centred.T @ centred) / np.outer(norms, norms)
    corr_clipped: npt.NDArray[np.float64] = np.clip(corr, -1.0, 1.0)
    np.fill_diagonal(corr_clipped, np.where(constant, np.nan, 1.0))
    return corr_clipped


def frobenius_distance(
    a: Sequence[Sequence[float]] | npt.NDArray[np.float64], b: Sequence[Sequence[float]] | npt.NDArray[np.float64]
) -> float:
    """Frobenius norm of ``a - b`` over every cell, diagonal included.

    Nothing is ignored: a NaN anywhere (e.g. from a zero-variance trait in ``correlation_matrix``)
    raises ValueError naming the cells, rather than silently dropping or zero-filling them.
    """
    left = np.asarray(a, dtype=float)
    right = np.asarray(b, dtype=float)
    if left.ndim != 2 or left.shape != right.shape:
        raise ValueError(f"need two matrices of the same shape, got {left.shape} and {right.shape}")
    for name, matrix in (("a", left), ("b", right)):
        bad = np.argwhere(np.isnan(matrix))
        if bad.size:
            cells = ", ".join(f"({i}, {j})" for i, j in bad[:6])
            raise ValueError(f"{name} has NaN at {cells}; a trait with zero variance has no correlation")
    return float(np.sqrt(((left - right) ** 2).sum()))


def normalise(probs: Sequence[float]) -> list[float]:
    """Scale non-negative option probabilities so they sum to 1."""
    values = [float(p) for p in probs]
    if not values:
        raise ValueError("no probabilities given")
    if any(not math.isfinite(p) or p < 0 for p in values):
        raise ValueError(f"probabilities must be finite and non-negative, got {values}")
    total = sum(values)
    if total <= 0:
        raise ValueError("probabilities sum to zero")
    return [p / total for p in values]


def expected_value(probs: Sequence[float]) -> float:
    """Expected answer sum_i i * p_i for options 1..len(probs), after normalising ``probs``."""
    weights = normalise(probs)
    value = sum(i * p for i, p in enumerate(weights, start=1))
    return min(max(value, 1.0), float(len(weights)))  # guard against rounding just outside the scale


# ----------------------------------------------------------------------------- answering and coverage

DEFAULT_MIN_OPTION_MASS = 0.01
"""Option-mass floor: an item whose options together get less of the model's probability than this
(1% of the next-token distribution in the digit mode; of the probability of saying one of the label
texts in the label-text modes) is recorded as a failure with its distribution, and has no value."""

DEFAULT_MIN_COVERAGE = 0.5
"""Coverage threshold: a trait whose answered share of (item, run) pairs is below this has no score."""


def answer_from_options(
    probs: Sequence[float] | None, mass: float, floor: float = DEFAULT_MIN_OPTION_MASS
) -> tuple[float | None, str | None]:
    """The expected answer of an option distribution, or (None, why) when the model did not answer.

    Below ``floor`` (or with no distribution at all) the item is a failure: "no answer: option mass
    0.0007 < floor 0.01". The distribution itself is kept by the caller either way.
    """
    if not 0 <= floor <= 1:
        raise ValueError(f"floor must lie in [0, 1], got {floor}")
    if probs is None or not math.isfinite(mass) or mass <= 0:
        return None, f"no answer: option mass {mass:.2g} (no probability on any option)"
    if mass < floor:
        return None, f"no answer: option mass {mass:.2g} < floor {floor:g}"
    return expected_value(probs), None


@dataclass(frozen=True)
class Coverage:
    """Answered (item, run) pairs of one trait out of all of them."""

    answered: int
    total: int

    @property
    def share(self) -> float | None:
        return self.answered / self.total if self.total else None

    def scored(self, threshold: float = DEFAULT_MIN_COVERAGE) -> bool:
        share = self.share
        return share is not None and share >= threshold


def trait_coverage(
    items: Sequence[ScoredItem], runs_answers: Sequence[Mapping[str, float | None]]
) -> dict[Trait, Coverage]:
    """Per trait: how many of its items were answered, over all runs (a run lacking an item counts it missing)."""
    out: dict[Trait, Coverage] = {}
    for trait in TRAITS:
        ids = [item.id for item in items if item.trait is trait]
        if ids:
            answered = sum(1 for run in runs_answers for i in ids if run.get(i) is not None)
            out[trait] = Coverage(answered=answered, total=len(ids) * len(runs_answers))
    return out


def format_score(mean: float | None, coverage: float | None, threshold: float = DEFAULT_MIN_COVERAGE) -> str:
    """A table cell: the score, or "n/a (coverage 3%)" when the trait was not answered enough."""
    if coverage is not None and coverage < threshold:
        return f"n/a (coverage {coverage:.0%})"
    return "-" if mean is None else f"{mean:.2f}"


# ----------------------------------------------------------------------------- reliability


@dataclass(frozen=True)
class Reliability:
    """Internal consistency of one trait's items across ``n`` respondents (rows) and ``k`` items."""

    alpha: float | None
    omega: float | None
    n: int
    k: int
    note: str | None = None  # why a value is None


def _complete_matrix(matrix: Sequence[Sequence[float]] | npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    rows = [list(row) for row in matrix]
    widths = {len(row) for row in rows}
    if len(widths) > 1:
        raise ValueError(f"ragged matrix: row lengths {sorted(widths)}")
    data = np.asarray(rows, dtype=float).reshape(len(rows), widths.pop() if widths else 0)
    if not np.all(np.isfinite(data)):
        raise ValueError("matrix contains NaN or infinite values; drop incomplete observations first")
    return data


HEYWOOD_UNIQUENESS = 1e-3
"""A standardised item's uniqueness below this in the one-factor fit: the fit is improper, omega is None."""


def mcdonald_omega(matrix: Sequence[Sequence[float]] | npt.NDArray[np.float64]) -> float | None:
    """McDonald's omega (total) of a rows-are-respondents, columns-are-items matrix.

    A one-factor model is fitted by maximum likelihood (scikit-learn's ``FactorAnalysis``) to the
    standardised items; omega = (sum of loadings)^2 / ((sum of loadings)^2 + sum of uniquenesses).
    None when undefined: fewer than 3 items (a one-factor model is not identified), fewer
    respondents than items, an item with zero variance, or an improper fit (a Heywood case: some
    item's uniqueness at ~0, which makes omega ~1 whatever the other items do; seen on the bundled
    model, where 10 personas x 3 near-identical runs are the respondents).
    """
    data = _complete_matrix(matrix)
    n, k = data.shape
    if k < 3 or n < k:
        return None
    sd = data.std(axis=0, ddof=1)
    if np.any(sd <= math.sqrt(_ZERO_VARIANCE)):
        return None
    from sklearn.decomposition import FactorAnalysis

    z = (data - data.mean(axis=0)) / data.std(axis=0, ddof=0)
    fa = FactorAnalysis(n_components=1, tol=1e-8, max_iter=2_000, random_state=0).fit(z)
    loadings = fa.components_[0]
    uniquenesses = fa.noise_variance_
    if float(uniquenesses.min()) < HEYWOOD_UNIQUENESS:
        return None
    common = float(abs(loadings.sum())) ** 2
    return common / (common + float(uniquenesses.sum()))


def reliability(matrix: Sequence[Sequence[float]] | npt.NDArray[np.float64]) -> Reliability:
    """Cronbach's alpha and McDonald's omega with n and k; both None where n < k or variance is zero."""
    data = _complete_matrix(matrix)
    n, k = data.shape
    if k < 2:
        return Reliability(None, None, n, k, "fewer than 2 items")
    if n < k:
        return Reliability(None, None, n, k, f"fewer respondents ({n}) than items ({k})")
    alpha = cronbach_alpha(data)
    omega = mcdonald_omega(data)
    note = None
    if alpha is None:
        note = "zero variance of the totals"
    elif omega is None:
        note = "omega undefined: needs 3+ items with nonzero variance and a proper one-factor fit"
    return Reliability(alpha, omega, n, k, note)


def icc_agreement(matrix: Sequence[Sequence[float]] | npt.NDArray[np.float64]) -> float | None:
    """ICC(2,1) of Shrout & Fleiss (two-way random effects, absolute agreement, single measurement).

    Rows are targets (items), columns are raters (runs). None when undefined: fewer than 2 rows or
    columns, or no variance at all.
    """
    data = _complete_matrix(matrix)
    n, k = data.shape
    if n < 2 or k < 2:
        return None
    grand = data.mean()
    ss_rows = k * float(((data.mean(axis=1) - grand) ** 2).sum())
    ss_cols = n * float(((data.mean(axis=0) - grand) ** 2).sum())
    ss_total = float(((data - grand) ** 2).sum())
    ss_error = ss_total - ss_rows - ss_cols
    ms_rows = ss_rows / (n - 1)
    ms_cols = ss_cols / (k - 1)
    ms_error = ss_error / ((n - 1) * (k - 1))
    denominator = ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n
    if ss_total <= _ZERO_VARIANCE or denominator <= _ZERO_VARIANCE:
        return None
    return (ms_rows - ms_error) / denominator


@dataclass(frozen=True)
class Retest:
    """Agreement of one assessment's runs on its items: ICC(2,1) and the mean Pearson r between runs."""

    icc: float | None
    mean_r: float | None
    n_items: int  # items answered in every run
    n_runs: int


def retest(runs_answers: Sequence[Mapping[str, float | None]]) -> Retest:
    """Test-retest agreement across runs over the items answered in every run (raw answers)."""
    n_runs = len(runs_answers)
    if n_runs < 2:
        return Retest(None, None, 0, n_runs)
    ids = sorted(set.intersection(*(({k for k, v in run.items() if v is not None}) for run in runs_answers)))
    if len(ids) < 2:
        return Retest(None, None, len(ids), n_runs)
    data = np.asarray([[float(run[i]) for run in runs_answers] for i in ids])  # type: ignore[arg-type]
    rs = []
    for a in range(n_runs):
        for b in range(a + 1, n_runs):
            x, y = data[:, a], data[:, b]
            if np.std(x) > 0 and np.std(y) > 0:
                rs.append(float(np.corrcoef(x, y)[0, 1]))
    return Retest(icc_agreement(data), float(np.mean(rs)) if rs else None, len(ids), n_runs)


def framing_sd(scores_by_framing: Mapping[Hashable, float | None]) -> float | None:
    """SD (ddof=1) of one trait's score across framings (item order, instruction and option wording);
    None with fewer than two scored framings."""
    present = [v for v in scores_by_framing.values() if v is not None]
    return float(np.std(present, ddof=1)) if len(present) > 1 else None
