"""Fidelity statistics: how well a method induces the personality it is asked for.

Pure functions over recoded item answers (reverse-keyed items already flipped), used by
``bench/fidelity.py`` and tested on planted data:

- :func:`gap_with_ci`: the induced-high minus induced-low score of the target trait, with a 95%
  percentile-bootstrap interval over the trait's items (paired: the same items on both sides).
- :func:`method_alpha` / :func:`trait_reliability`: Cronbach's alpha (and McDonald's omega) of each
  trait's items, with every run of every assessment of one method as one respondent (the induced
  personas supply the variance that makes them meaningful), with n and k, None where undefined.
- :func:`off_target_shift`: how far the four other traits move from Direct when one trait is induced.
- :func:`correlation_distance`: Frobenius distance between the 5x5 correlation matrix of the 10
  induced conditions' profiles and the human matrix (the paper's check).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from big5core.traits import TRAITS, Trait
from evaluator import scoring
from evaluator.stats import bootstrap_ci

Runs = Sequence[Mapping[str, float]]
"""One assessment's recoded answers: one ``item_id -> value`` mapping per run."""


@dataclass(frozen=True)
class Condition:
    """One assessment of a method: its target pole (None for Direct) and its recoded answers."""

    method: str
    trait: Trait | None
    level: str | None  # "high" | "low" | None
    runs: Runs


@dataclass
class Gap:
    high: float
    low: float
    gap: float
    ci_low: float
    ci_high: float
    n_items: int

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0


@dataclass
class MethodFidelity:
    method: str
    gaps: dict[Trait, Gap] = field(default_factory=dict)
    alpha: dict[Trait, float | None] = field(default_factory=dict)
    reliability: dict[Trait, scoring.Reliability] = field(default_factory=dict)  # alpha, omega, n, k
    off_target: dict[Trait, float] = field(default_factory=dict)  # mean over both levels
    correlation_distance: float | None = None
    correlation_note: str | None = None


def item_means(runs: Runs, item_ids: Sequence[str]) -> dict[str, float]:
    """Each item's answer averaged over the runs that answered it (items never answered are left out)."""
    out: dict[str, float] = {}
    for item_id in item_ids:
        values = [run[item_id] for run in runs if item_id in run]
        if values:
            out[item_id] = float(np.mean(values))
    return out


def trait_score(runs: Runs, item_ids: Sequence[str]) -> float | None:
    means = item_means(runs, item_ids)
    return float(np.mean(list(means.values()))) if means else None


def gap_with_ci(
    high: Runs, low: Runs, item_ids: Sequence[str], *, n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> Gap:
    """High-minus-low score of one trait with a paired percentile-bootstrap CI over its items.

    Each item's answer is averaged over runs on each side; items answered on both sides are the
    units, resampled with replacement ``n_boot`` times. The interval reflects which items the
    inventory happens to use, the dominant uncertainty when runs differ only in instruction wording.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    h, lo = item_means(high, item_ids), item_means(low, item_ids)
    shared = [i for i in item_ids if i in h and i in lo]
    if len(shared) < 2:
        raise ValueError(f"need at least 2 items answered on both sides, got {len(shared)}")
    diffs = np.array([h[i] - lo[i] for i in shared])
    tail = (1 - level) / 2 * 100
    ci_low, ci_high = bootstrap_ci(diffs, resamples=n_boot, seed=seed, percentiles=(tail, 100 - tail))
    return Gap(
        high=float(np.mean([h[i] for i in shared])),
        low=float(np.mean([lo[i] for i in shared])),
        gap=float(diffs.mean()),
        ci_low=float(ci_low),
        ci_high=float(ci_high),
        n_items=len(shared),
    )


def method_alpha(conditions: Sequence[Condition], item_ids: Sequence[str]) -> float | None:
    """Cronbach's alpha of ``item_ids`` with each run of each condition one respondent (listwise)."""
    rows = [[run[i] for i in item_ids] for c in conditions for run in c.runs if all(i in run for i in item_ids)]
    return scoring.cronbach_alpha(rows)


def respondent_matrix(runs: Runs, item_ids: Sequence[str]) -> list[list[float]]:
    """Rows of the respondents (runs) that answered every one of ``item_ids`` (listwise deletion)."""
    return [[float(run[i]) for i in item_ids] for run in runs if all(i in run for i in item_ids)]


def trait_reliability(runs: Runs, items_by_trait: Mapping[Trait, Sequence[str]]) -> dict[Trait, scoring.Reliability]:
    """Alpha and omega per trait over respondents that really differ: pass the runs of every persona
    (every assessment of a group: personas x runs), recoded. n counts the complete respondents."""
    return {t: scoring.reliability(respondent_matrix(runs, ids)) for t, ids in items_by_trait.items() if ids}


def profile(runs: Runs, items_by_trait: Mapping[Trait, Sequence[str]]) -> dict[Trait, float | None]:
    return {t: trait_score(runs, ids) for t, ids in items_by_trait.items()}


def off_target_shift(
    induced: Mapping[Trait, float | None], direct: Mapping[Trait, float | None], target: Trait
) -> float:
    """Mean absolute change of the four non-target traits from Direct's scores (1-5 scale points)."""
    shifts = [
        abs(v - d)
        for t in TRAITS
        if t is not target and (v := induced.get(t)) is not None and (d := direct.get(t)) is not None
    ]
    if not shifts:
        raise ValueError("no non-target trait is scored on both sides")
    return float(np.mean(shifts))


def correlation_distance(
    profiles: Sequence[Mapping[Trait, float | None]], human: Sequence[Sequence[float]]
) -> tuple[float | None, str | None]:
    """(Frobenius distance to ``human``, None) or (None, why it is undefined)."""
    complete = [{t: float(v) for t, v in p.items() if v is not None} for p in profiles]
    try:
        matrix = scoring.correlation_matrix(complete)
        return scoring.frobenius_distance(matrix, human), None
    except ValueError as exc:
        return None, str(exc)


def analyse(
    conditions: Sequence[Condition],
    items_by_trait: Mapping[Trait, Sequence[str]],
    human: Sequence[Sequence[float]],
    *,
    n_boot: int = 10_000,
    seed: int = 0,
) -> tuple[dict[Trait, float | None] | None, dict[str, MethodFidelity]]:
    """Direct's profile and every other method's fidelity from the assessments of one inventory.

    A method's gap for a trait needs one high and one low condition of that trait; several
    assessments of one condition are pooled (their runs together).
    """
    by_method: dict[str, dict[tuple[Trait, str], list[Mapping[str, float]]]] = {}
    direct_runs: list[Mapping[str, float]] = []
    for c in conditions:
        if c.trait is None:
            direct_runs.extend(c.runs)
        else:
            by_method.setdefault(c.method, {}).setdefault((c.trait, c.level or ""), []).extend(c.runs)
    direct = profile(direct_runs, items_by_trait) if direct_runs else None
    results: dict[str, MethodFidelity] = {}
    for method, cells in by_method.items():
        fid = MethodFidelity(method)
        profiles = {cell: profile(runs, items_by_trait) for cell, runs in cells.items()}
        for trait in TRAITS:
            high, low = cells.get((trait, "high")), cells.get((trait, "low"))
            if high and low:
                fid.gaps[trait] = gap_with_ci(high, low, items_by_trait[trait], n_boot=n_boot, seed=seed)
            if direct is not None:
                shifts = [
                    off_target_shift(profiles[(trait, level)], direct, trait)
                    for level in ("high", "low")
                    if (trait, level) in profiles
                ]
                if shifts:
                    fid.off_target[trait] = float(np.mean(shifts))
        method_conditions = [Condition(method, t, lv, runs) for (t, lv), runs in cells.items()]
        fid.alpha = {t: method_alpha(method_conditions, ids) for t, ids in items_by_trait.items()}
        fid.reliability = trait_reliability([run for c in method_conditions for run in c.runs], items_by_trait)
        if len(profiles) >= 2:
            fid.correlation_distance, fid.correlation_note = correlation_distance(list(profiles.values()), human)
        results[method] = fid
    return direct, results
