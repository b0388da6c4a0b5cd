"""Reports of reply quality beside the trait effect: one row per method, convergent validity, the figure.

Pure functions over stored replies (text and :mod:`evaluator.quality` measures per reply, grouped by
persona label ``"<method>|<trait>|<level>"``), so they are tested on tables; the quickstart and
``bench/fidelity.py`` feed them stored assessments.

- :func:`method_quality`: per method, over its ten trait-level conditions: mean repeated-3-gram share
  [95% CI over replies], the worst condition's shared-opening share (collapse), mean distinct-2,
  mean relevance and its ratio to the real replies' of the same scenarios, the geometric-mean
  perplexity under the base model, and the questionnaire coverage of the same personas;
- :func:`convergent_validity`: per trait, Pearson r across personas between the questionnaire score
  and the judge's mean P(high) of the persona's replies, with a Fisher-z 95% CI;
- :func:`quality_targets`: issue 25's quality bounds, met or missed with the number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evaluator import quality

REPETITION_MAX = 0.10
SHARED_OPENING_MAX = 0.25
RELEVANCE_RATIO_MIN = 0.8
COVERAGE_MIN = 0.8


@dataclass
class Replies:
    """One persona's (or one real arm's) replies: texts and per-reply quality dicts, in the same order."""

    texts: list[str] = field(default_factory=list)
    qualities: list[dict[str, Any]] = field(default_factory=list)


def from_responses(responses: Sequence[Any]) -> Replies:
    """Stored responses (``ItemResponse`` rows) of run 0 that were answered and measured."""
    out = Replies()
    for r in responses:
        if r.run == 0 and getattr(r, "quality", None) and r.raw_text:
            out.texts.append(r.raw_text)
            out.qualities.append(dict(r.quality))
    return out


@dataclass
class QualityRow:
    title: str
    n_conditions: int
    n_replies: int
    repetition: float | None
    repetition_ci: tuple[float, float] | None
    worst_opening: float | None
    worst_opening_text: str | None
    worst_opening_cell: str | None
    distinct_2: float | None
    relevance: float | None
    relevance_ratio: float | None
    perplexity: float | None
    coverage_mean: float | None = None
    coverage_min: float | None = None
    gap_mean: float | None = None
    gap_min: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarise_group(title: str, cells: Mapping[str, Replies], real_relevance: float | None = None) -> QualityRow:
    """One method's row over its conditions (``cells``: condition label -> replies): the per-reply measures
    of all its replies pooled (:func:`evaluator.quality.summarise`), and per condition the share of replies
    with a shared opening (the worst condition's) and distinct-2 (the mean over conditions)."""
    pooled = quality.summarise([q for c in cells.values() for q in c.qualities], [])
    worst: tuple[float, str | None, str | None] = (-1.0, None, None)
    distinct: list[float] = []
    for label, c in cells.items():
        share, top = quality.shared_opening(c.texts)
        if share is not None and share > worst[0]:
            worst = (share, top, label)
        d2 = quality.distinct_n(c.texts, 2)
        if d2 is not None:
            distinct.append(d2)
    repetition, relevance = pooled["repetition"], pooled["relevance"]["mean"]
    ci = repetition["ci95"]
    return QualityRow(
        title=title,
        n_conditions=len(cells),
        n_replies=pooled["n"],
        repetition=repetition["mean"],
        repetition_ci=(ci[0], ci[1]) if ci else None,
        worst_opening=worst[0] if worst[1] is not None else None,
        worst_opening_text=worst[1],
        worst_opening_cell=worst[2],
        distinct_2=_mean(distinct),
        relevance=relevance,
        relevance_ratio=relevance / real_relevance if relevance is not None and real_relevance else None,
        perplexity=pooled["perplexity"]["mean"],
    )


def method_quality(
    replies: Mapping[str, Replies],
    methods: Sequence[tuple[str, str]],
    reference: Mapping[str, Replies] | None = None,
    coverage: Mapping[str, float] | None = None,
    gaps: Mapping[str, Mapping[str, float | None]] | None = None,
) -> list[QualityRow]:
    """Rows: real replies (``reference``: ``"<trait>|<level>"`` -> replies), Direct, then each method present.

    ``replies`` maps persona labels (``"direct"``, ``"<prefix>|<trait>|<level>"``) to replies;
    ``methods`` the (prefix, title) pairs in table order; ``coverage`` persona label -> questionnaire
    coverage; ``gaps`` title -> trait -> judge gap.
    """
    rows: list[QualityRow] = []
    real_rel = None
    if reference:
        real = summarise_group("real replies", {f"real|{k}": v for k, v in reference.items()})
        real_rel = real.relevance
        real.relevance_ratio = 1.0 if real_rel else None
        rows.append(real)
    groups: list[tuple[str, dict[str, Replies], list[str]]] = []
    if "direct" in replies:
        groups.append(("Direct", {"direct": replies["direct"]}, ["direct"]))
    for prefix, title in methods:
        cells = {k: v for k, v in replies.items() if k.startswith(f"{prefix}|") and k.count("|") == 2}
        if cells:
            groups.append((title, cells, list(cells)))
    for title, cells, labels in groups:
        row = summarise_group(title, cells, real_rel)
        if coverage:
            covs = [coverage[label] for label in labels if label in coverage]
            row.coverage_mean, row.coverage_min = _mean(covs), (min(covs) if covs else None)
        if gaps and title in gaps:
            values = [v for v in gaps[title].values() if v is not None]
            row.gap_mean, row.gap_min = _mean(values), (min(values) if values else None)
        rows.append(row)
    return rows


def format_rows(rows: Sequence[QualityRow]) -> str:
    def f(v: float | None, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    lines = [
        "reply quality (held-out turns): repeated word 3-grams per reply [95% CI]; worst cell's shared opening "
        "(first 3 words); distinct-2; relevance to the turn (TF-IDF cosine) and its ratio to the real replies'; "
        "perplexity under the base model; BFI coverage mean/min; judge gap mean/min",
        f"{'method':<18}{'repeat3':>20}{'worst opening':>16}{'dist-2':>8}{'relevance':>16}{'ppl':>8}"
        f"{'coverage':>12}{'gap':>13}",
    ]
    for r in rows:
        ci = f" [{r.repetition_ci[0]:.2f},{r.repetition_ci[1]:.2f}]" if r.repetition_ci else ""
        rel = f"{f(r.relevance, '.3f')} ({f(r.relevance_ratio)}x)"
        cov = f"{f(r.coverage_mean)}/{f(r.coverage_min)}" if r.coverage_mean is not None else "-"
        gap = f"{f(r.gap_mean, '+.2f')}/{f(r.gap_min, '+.2f')}" if r.gap_mean is not None else "-"
        lines.append(
            f"{r.title:<18}{f(r.repetition) + ci:>20}{f(r.worst_opening):>16}{f(r.distinct_2):>8}{rel:>16}"
            f"{f(r.perplexity, '.1f'):>8}{cov:>12}{gap:>13}"
        )
    worst = [r for r in rows if r.worst_opening_text and r.title != "real replies"]
    for r in worst:
        lines.append(f"  {r.title}: most shared opening {r.worst_opening_text!r} in {r.worst_opening_cell}")
    return "\n".join(lines)


def quality_targets(rows: Sequence[QualityRow]) -> dict[str, dict[str, tuple[bool, str]]]:
    """Per method row (not the reference, not Direct): each quality bound of issue 25, met or missed."""
    out: dict[str, dict[str, tuple[bool, str]]] = {}
    for r in rows:
        if r.title in ("real replies", "Direct"):
            continue
        checks: dict[str, tuple[bool, str]] = {}
        if r.repetition is not None:
            checks["repetition <= 0.10"] = (r.repetition <= REPETITION_MAX, f"{r.repetition:.3f}")
        if r.worst_opening is not None:
            checks["shared opening <= 25%"] = (r.worst_opening <= SHARED_OPENING_MAX, f"{r.worst_opening:.0%}")
        if r.relevance_ratio is not None:
            checks["relevance >= 0.8x real"] = (r.relevance_ratio >= RELEVANCE_RATIO_MIN, f"{r.relevance_ratio:.2f}x")
        if r.coverage_min is not None:
            checks["BFI coverage >= 0.8"] = (r.coverage_min >= COVERAGE_MIN, f"min {r.coverage_min:.2f}")
        out[r.title] = checks
    return out


@dataclass
class Correlation:
    trait: str
    r: float | None
    ci: tuple[float, float] | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"trait": self.trait, "r": self.r, "ci95": self.ci, "n": self.n}


def pearson_ci(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, tuple[float, float] | None]:
    """Pearson r with a Fisher-z 95% CI (None where undefined: n < 4 or no variance)."""
    if len(x) < 4 or len(set(x)) < 2 or len(set(y)) < 2:
        return None, None
    r = float(np.corrcoef(x, y)[0, 1])
    if not math.isfinite(r):
        return None, None
    z, se = math.atanh(max(min(r, 0.999999), -0.999999)), 1 / math.sqrt(len(x) - 3)
    return r, (math.tanh(z - 1.96 * se), math.tanh(z + 1.96 * se))


def convergent_validity(
    questionnaire: Mapping[str, Mapping[str, float | None]],
    judged: Mapping[str, Mapping[str, float | None]],
    traits: Sequence[str],
) -> list[Correlation]:
    """Per trait: r across the personas scored both ways (questionnaire trait score vs judge mean P(high))."""
    out = []
    for trait in traits:
        pairs = [
            (float(q[trait]), float(j[trait]))
            for label, q in questionnaire.items()
            if (j := judged.get(label)) is not None and q.get(trait) is not None and j.get(trait) is not None
        ]
        r, ci = pearson_ci([p[0] for p in pairs], [p[1] for p in pairs])
        out.append(Correlation(trait, r, ci, len(pairs)))
    return out


def format_validity(rows: Sequence[Correlation], inventory: str) -> str:
    lines = [
        f"convergent validity: Pearson r across personas between the {inventory} trait score and the judge's "
        "mean P(high) of the persona's replies [Fisher-z 95% CI] (Serapio-Garcia et al. 2025: 0.67 for their "
        "largest models)",
    ]
    for c in rows:
        ci = f" [{c.ci[0]:+.2f},{c.ci[1]:+.2f}]" if c.ci else ""
        lines.append(f"  {c.trait:<18}{'-' if c.r is None else format(c.r, '+.2f')}{ci}  n={c.n}")
    return "\n".join(lines)


def gap_quality_figure(rows: Sequence[QualityRow], fmt: str = "png") -> bytes:
    """Mean judge gap against each quality measure, one point per method (matplotlib, Agg)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = (
        ("repetition", "repeated word 3-grams per reply", REPETITION_MAX),
        ("worst_opening", "worst cell: share with one opening", SHARED_OPENING_MAX),
        ("relevance_ratio", "relevance / real replies'", RELEVANCE_RATIO_MIN),
        ("coverage_min", "BFI coverage (worst persona)", COVERAGE_MIN),
    )
    fig, axes = plt.subplots(1, len(measures), figsize=(4 * len(measures), 3.6), sharey=True)
    for ax, (key, label, bound) in zip(axes, measures, strict=True):
        for r in rows:
            x, y = getattr(r, key), r.gap_mean
            if x is None or y is None:
                continue
            ax.scatter([x], [y])
            ax.annotate(r.title, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(bound, color="grey", lw=0.6, ls="--")
        ax.set_xlabel(label)
    axes[0].set_ylabel("mean judge gap (high - low)")
    fig.suptitle("Trait effect against reply quality, per method")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt)
    plt.close(fig)
    return buffer.getvalue()
