"""Reports of the dialogue assessment: high-low gaps with paired CIs, dose-response, 2x2 mixtures.

Pure functions over judge scores per item (``{item_id: {trait: P(high)}}``, one mapping per
persona), so they are tested on tables; the quickstart and ``bench/fidelity.py`` feed them
stored assessments (:func:`item_scores`).

- gap: induced-high minus induced-low mean judge score of the target trait, with a percentile
  bootstrap 95% CI over the items both personas answered (paired: the same Speaker X turns);
- dose-response: the judge score of a trait at requested values -1 .. +1; Spearman of the level
  means against the levels (1.0 = strictly increasing) and over every reply (item level);
- mixtures: in a 2x2 of traits A and B at +-1, each trait's own effect (mean judge_A at A+ minus
  at A-, averaged over B) and its effect on the other trait's judge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evaluator.stats import bootstrap_ci

ItemScores = Mapping[str, Mapping[str, float]]
"""item id -> trait -> the judge's P(high) of the persona's reply to that item"""


def item_scores(responses: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Stored responses (``ItemResponse`` rows or ``Response``) -> item id -> judge scores (run 0, answered only)."""
    out: dict[str, dict[str, float]] = {}
    for r in responses:
        if getattr(r, "judge_scores", None) and r.run == 0:
            out[r.item_id] = {k: float(v) for k, v in r.judge_scores.items()}
    return out


def mean_score(scores: ItemScores, trait: str) -> float | None:
    values = [s[trait] for s in scores.values() if trait in s]
    return float(np.mean(values)) if values else None


@dataclass
class PairedGap:
    high: float | None
    low: float | None
    gap: float | None
    ci: tuple[float, float] | None
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.ci is not None and (self.ci[0] > 0 or self.ci[1] < 0)

    def to_dict(self) -> dict[str, Any]:
        return {"high": self.high, "low": self.low, "gap": self.gap, "ci95": self.ci, "n": self.n}


def paired_gap(high: ItemScores, low: ItemScores, trait: str, *, n_boot: int = 5000, seed: int = 0) -> PairedGap:
    """Gap of ``trait``'s judge score between two personas over the items both answered, paired bootstrap CI."""
    common = sorted(set(high) & set(low))
    diffs = np.asarray([high[i][trait] - low[i][trait] for i in common if trait in high[i] and trait in low[i]])
    h, lo = mean_score(high, trait), mean_score(low, trait)
    if diffs.size == 0:
        return PairedGap(h, lo, None, None, 0)
    ci = bootstrap_ci(diffs, resamples=n_boot, seed=seed)
    return PairedGap(h, lo, float(diffs.mean()), ci, int(diffs.size))


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rho = spearmanr(x, y).statistic
    return None if rho is None or np.isnan(rho) else float(rho)


@dataclass
class DoseResponse:
    trait: str
    levels: list[float]
    means: list[float | None]
    level_spearman: float | None
    item_spearman: float | None
    n_items: list[int] = field(default_factory=list)

    @property
    def strictly_increasing(self) -> bool:
        values = [m for m in self.means if m is not None]
        return len(values) == len(self.means) and all(a < b for a, b in zip(values, values[1:], strict=False))

    def to_dict(self) -> dict[str, Any]:
        return {
            "trait": self.trait,
            "levels": self.levels,
            "means": self.means,
            "n_items": self.n_items,
            "level_spearman": self.level_spearman,
            "item_spearman": self.item_spearman,
            "strictly_increasing": self.strictly_increasing,
        }


def dose_response(trait: str, by_level: Mapping[float, ItemScores]) -> DoseResponse:
    """The trait's judge score at each requested level; Spearman of the means and of every reply."""
    levels = sorted(by_level)
    means = [mean_score(by_level[lv], trait) for lv in levels]
    xs: list[float] = []
    ys: list[float] = []
    for lv in levels:
        for scores in by_level[lv].values():
            if trait in scores:
                xs.append(lv)
                ys.append(scores[trait])
    level_rho = _spearman(levels, [m for m in means if m is not None]) if None not in means else None
    return DoseResponse(trait, levels, means, level_rho, _spearman(xs, ys), [len(by_level[lv]) for lv in levels])


@dataclass
class Mixture:
    traits: tuple[str, str]
    cells: dict[str, float | None]
    """``"+1/+1"`` etc. -> (mean judge of trait A, of trait B) flattened as ``"A:+1/+1"``"""
    own: dict[str, float | None]
    cross: dict[str, float | None]

    def meets(self, own_min: float = 0.25, cross_max: float = 0.10) -> bool:
        own_ok = all(v is not None and v >= own_min for v in self.own.values())
        cross_ok = all(v is not None and abs(v) <= cross_max for v in self.cross.values())
        return own_ok and cross_ok

    def to_dict(self) -> dict[str, Any]:
        return {"traits": list(self.traits), "cells": self.cells, "own": self.own, "cross": self.cross}


def mixture(a: str, b: str, cells: Mapping[tuple[int, int], ItemScores]) -> Mixture:
    """A 2x2 of traits ``a`` and ``b`` at (+-1, +-1): main effects of each on both judges."""

    def m(sa: int, sb: int, trait: str) -> float | None:
        return mean_score(cells[(sa, sb)], trait) if (sa, sb) in cells else None

    def effect(on: str, of_a: bool) -> float | None:
        diffs = []
        for other in (1, -1):
            plus = m(1, other, on) if of_a else m(other, 1, on)
            minus = m(-1, other, on) if of_a else m(other, -1, on)
            if plus is None or minus is None:
                return None
            diffs.append(plus - minus)
        return float(np.mean(diffs))

    table = {f"{t}:{sa:+d}/{sb:+d}": m(sa, sb, t) for t in (a, b) for sa in (1, -1) for sb in (1, -1)}
    return Mixture(
        (a, b),
        table,
        own={a: effect(a, True), b: effect(b, False)},
        cross={f"{a}->{b}": effect(b, True), f"{b}->{a}": effect(a, False)},
    )


def dose_figure(
    curves: Sequence[DoseResponse],
    ceiling: Mapping[str, float] | None = None,
    fmt: str = "png",
    title: str = "Dialogue dose-response (composed per-trait adapters)",
) -> bytes:
    """Judge score against requested level, one line per trait (matplotlib, Agg)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for curve in curves:
        points = [(lv, m) for lv, m in zip(curve.levels, curve.means, strict=True) if m is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=curve.trait)
    ax.set_xlabel("requested trait value")
    ax.set_ylabel("trait judge P(high | reply)")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_title(title)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format=fmt)
    plt.close(fig)
    return buffer.getvalue()
