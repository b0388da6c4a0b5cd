"""The paper's table shape from stored assessments, and pictures of it.

For each comparable group and each trait: the score of the induced trait when induced high and when
induced low (mean over the matching assessments, with n), plus Direct (no persona) as a reference.
A group is one method with one adapter family and version, layout, scoring mode, number of runs and
base model (:class:`GroupKey`): assessments that differ in any of these are never averaged together.
A trait whose coverage was below the threshold has no score; its cell reads "n/a (coverage 3%)".
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from big5core.errors import Invalid
from big5core.models import Assessment
from big5core.prompts import TemplateId
from big5core.training import PER_TRAIT, UNIFIED
from big5core.traits import METHOD_ORDER, TRAITS, Level, Trait
from evaluator.scoring import Reliability

_PER_TRAIT_SUFFIX = re.compile(
    "-(" + "|".join(t.value for t in TRAITS) + ")-(" + "|".join(lv.value for lv in Level) + ")$"
)


class MixedBaseModels(Invalid):
    """A comparison would put assessments of different base models in one table."""

    code, title = "mixed-base-models", "The comparison mixes base models"


@dataclass(frozen=True, order=True)
class GroupKey:
    """What must be equal for assessments to be averaged into one row of the table."""

    method: str
    adapter: str | None  # adapter family and version, e.g. "sft-unified@1" or "sft@1" (per-trait arms)
    layout: str | None  # unified | per-trait | None (no adapter)
    scoring: str
    runs: int
    base_model: str | None

    def label(self) -> str:
        parts = [self.method]
        if self.adapter:
            parts.append(self.adapter)
        if self.layout:
            parts.append(self.layout)
        parts.append(f"{self.scoring} x{self.runs}")
        return " ".join(parts)


def adapter_family(ref: str) -> str:
    """``sft-openness-high@3`` -> ``sft@3``: the per-trait arms of one training run form one family."""
    name, _, version = ref.partition("@")
    name = _PER_TRAIT_SUFFIX.sub("", name)
    return f"{name}@{version}" if version else name


def group_key(assessment: Assessment) -> GroupKey:
    resolved = assessment.resolved_persona or {}
    refs = sorted({str(p["adapter"]) for p in resolved.get("parts") or [] if p.get("adapter")})
    adapter = ",".join(sorted({adapter_family(r) for r in refs})) or None
    if adapter is None:
        layout = None
    elif resolved.get("template_id") in (TemplateId.UNIFIED, TemplateId.UNIFIED_SYSTEM):  # user or system turn
        layout = UNIFIED
    else:
        layout = PER_TRAIT
    return GroupKey(
        method=assessment.method,
        adapter=adapter,
        layout=layout,
        scoring=assessment.scoring_mode,
        runs=assessment.runs,
        base_model=resolved.get("base_model"),
    )


@dataclass
class Side:
    """One side (induced high or low) of a cell: the scored assessments and the unscored ones."""

    values: list[float] = field(default_factory=list)
    coverages: list[float] = field(default_factory=list)  # of every assessment, scored or not

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def n_unscored(self) -> int:
        return len(self.coverages) - len(self.values)

    @property
    def coverage(self) -> float | None:
        return sum(self.coverages) / len(self.coverages) if self.coverages else None

    def text(self) -> str:
        if not self.coverages:
            return "-"
        if self.mean is None:
            return f"n/a (coverage {self.coverage or 0.0:.0%})"
        return f"{self.mean:.2f}"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "n": self.n, "n_unscored": self.n_unscored, "coverage": self.coverage}


@dataclass
class Cell:
    high: Side = field(default_factory=Side)
    low: Side = field(default_factory=Side)

    @property
    def gap(self) -> float | None:
        h, lo = self.high.mean, self.low.mean
        return None if h is None or lo is None else h - lo


@dataclass
class PaperTable:
    inventory: str
    direct: dict[GroupKey, dict[str, Side]] = field(default_factory=dict)
    rows: dict[GroupKey, dict[str, Cell]] = field(default_factory=dict)
    n: dict[GroupKey, int] = field(default_factory=dict)  # assessments per group
    reliability: dict[GroupKey, dict[str, Reliability]] = field(default_factory=dict)

    def base_models(self) -> set[str | None]:
        return {k.base_model for k in [*self.direct, *self.rows]}

    def to_dict(self) -> dict[str, Any]:
        def rel(key: GroupKey) -> dict[str, Any] | None:
            found = self.reliability.get(key)
            return None if found is None else {t: asdict(r) for t, r in found.items()}

        return {
            "inventory": self.inventory,
            "direct": [
                {
                    "group": asdict(k),
                    "n": self.n.get(k, 0),
                    "traits": {t: s.to_dict() for t, s in v.items()},
                    "reliability": rel(k),
                }
                for k, v in sorted(self.direct.items(), key=lambda kv: _order(kv[0]))
            ],
            "groups": [
                {
                    "group": asdict(k),
                    "label": k.label(),
                    "n": self.n.get(k, 0),
                    "traits": {
                        t: {"high": c.high.to_dict(), "low": c.low.to_dict(), "gap": c.gap} for t, c in cells.items()
                    },
                    "reliability": rel(k),
                }
                for k, cells in sorted(self.rows.items(), key=lambda kv: _order(kv[0]))
            ],
        }

    def format(self) -> str:
        """A plain-text table: one row per group, 'high / low' per trait, n per row; the columns widen
        to the longest cell (an unscored side reads "n/a (coverage x%)")."""
        width = max([len(k.label()) for k in [*self.rows, *self.direct]] + [6]) + 2
        body: list[tuple[GroupKey, list[str]]] = [
            (key, [sides[t.value].text() if t.value in sides else "-" for t in TRAITS])
            for key, sides in sorted(self.direct.items(), key=lambda kv: _order(kv[0]))
        ] + [
            (key, [_sides(row, t) for t in TRAITS])
            for key, row in sorted(self.rows.items(), key=lambda kv: _order(kv[0]))
        ]
        column = max([len(c) + 2 for _, cells in body for c in cells] + [26])
        header = f"{'group':<{width}}{'n':>4}" + "".join(f"{t.value[:13]:>{column}}" for t in TRAITS)
        lines = [f"{self.inventory}: score of the induced trait, induced high / low (1-5)", header]
        for key, cells in body:
            lines.append(f"{key.label():<{width}}{self.n.get(key, 0):>4}" + "".join(f"{c:>{column}}" for c in cells))
        bases = sorted(str(b) for b in self.base_models())
        lines.append(f"base model{'s' if len(bases) > 1 else ''}: {', '.join(bases) or '-'}")
        return "\n".join(lines)


def _sides(row: dict[str, Any], trait: Trait) -> str:
    cell = row.get(trait.value)
    return "-" if cell is None else f"{cell.high.text()} / {cell.low.text()}"


def _order(key: GroupKey) -> tuple[int, GroupKey]:
    return (METHOD_ORDER.index(key.method) if key.method in METHOD_ORDER else 99, key)


def single_trait(assessment: Assessment) -> tuple[Trait, float] | None:
    """The one trait an assessment's persona sets, at whatever intensity (None for none or several)."""
    traits = (assessment.resolved_persona or {}).get("traits") or {}
    nonzero = {k: v for k, v in traits.items() if v}
    if len(nonzero) != 1:
        return None
    ((name, value),) = nonzero.items()
    return Trait(name), float(value)


def trait_means(assessment: Assessment) -> dict[str, float | None]:
    return {s.key: s.mean for s in assessment.scores if s.scope == "trait"}


def trait_coverage(assessment: Assessment) -> dict[str, float]:
    """Coverage per trait; 1.0 for assessments stored before coverage was recorded."""
    return {s.key: 1.0 if s.coverage is None else s.coverage for s in assessment.scores if s.scope == "trait"}


def check_base_models(assessments: Sequence[Assessment], *, allow_mixed: bool = False) -> set[str | None]:
    """The base models among ``assessments``; :class:`MixedBaseModels` for more than one unless allowed."""
    found = {group_key(a).base_model for a in assessments}
    if len(found) > 1 and not allow_mixed:
        names = ", ".join(sorted(str(b) for b in found))
        raise MixedBaseModels(
            f"these assessments ran on {len(found)} base models ({names}); restrict to one with base_model, "
            "or set mix_base_models to put them in one table (in separate rows)"
        )
    return found


def paper_table(
    assessments: Sequence[Assessment],
    inventory: str,
    reliability: Mapping[GroupKey, dict[str, Reliability]] | None = None,
) -> PaperTable:
    """Aggregate done assessments of one inventory into the paper's high/low table, one row per group."""
    table = PaperTable(inventory=inventory, reliability=dict(reliability or {}))
    for a in assessments:
        if a.state != "done":
            continue
        key = group_key(a)
        means, coverage = trait_means(a), trait_coverage(a)
        if a.method == "direct":
            table.n[key] = table.n.get(key, 0) + 1
            sides = table.direct.setdefault(key, {})
            for trait, value in means.items():
                side = sides.setdefault(trait, Side())
                side.coverages.append(coverage.get(trait, 1.0))
                if value is not None:
                    side.values.append(value)
            continue
        pole = single_trait(a)
        if pole is None or abs(pole[1]) != 1.0:
            continue
        trait, value = pole
        table.n[key] = table.n.get(key, 0) + 1
        cell = table.rows.setdefault(key, {}).setdefault(trait.value, Cell())
        side = cell.high if value > 0 else cell.low
        side.coverages.append(coverage.get(trait.value, 1.0))
        if (score := means.get(trait.value)) is not None:
            side.values.append(score)
    return table


def groups(assessments: Sequence[Assessment]) -> dict[GroupKey, list[Assessment]]:
    """Done assessments by :class:`GroupKey`."""
    out: dict[GroupKey, list[Assessment]] = defaultdict(list)
    for a in assessments:
        if a.state == "done":
            out[group_key(a)].append(a)
    return dict(out)


def table_figure(table: PaperTable, fmt: str = "svg") -> bytes:
    """Grouped bars: per trait, each method's induced-high and induced-low score; Direct as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted(table.rows, key=_order)
    direct = next(iter(sorted(table.direct.items(), key=lambda kv: _order(kv[0]))), (None, {}))[1]
    fig, axes = plt.subplots(1, len(TRAITS), figsize=(3.2 * len(TRAITS), 3.6), sharey=True)
    for ax, trait in zip(axes, TRAITS, strict=True):
        xs = range(len(methods))
        highs = [table.rows[m].get(trait.value, Cell()).high.mean or 0 for m in methods]
        lows = [table.rows[m].get(trait.value, Cell()).low.mean or 0 for m in methods]
        ax.bar([x - 0.2 for x in xs], highs, width=0.4, label="induced high", color="#3b7dd8")
        ax.bar([x + 0.2 for x in xs], lows, width=0.4, label="induced low", color="#d8703b")
        if trait.value in direct and direct[trait.value].mean is not None:
            ax.axhline(direct[trait.value].mean, color="grey", linestyle="--", linewidth=1, label="direct")
        ax.set_xticks(list(xs), [m.label() for m in methods], rotation=30, fontsize=6)
        ax.set_ylim(1, 5)
        ax.set_title(trait.title)
    axes[0].set_ylabel(f"{table.inventory} score (1-5)")
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _save(fig, fmt)


def profile_figure(profiles: dict[str, dict[str, float | None]], title: str, fmt: str = "svg") -> bytes:
    """One line per persona across the five traits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, means in profiles.items():
        ax.plot([t.title for t in TRAITS], [means.get(t.value) for t in TRAITS], marker="o", label=label)
    ax.set_ylim(1, 5)
    ax.set_ylabel("score (1-5)")
    ax.set_title(title)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return _save(fig, fmt)


def _save(fig: Any, fmt: str) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt)
    plt.close(fig)
    return buffer.getvalue()


def group_reliability(
    grouped: Mapping[GroupKey, Sequence[Assessment]],
    values: Mapping[str, Sequence[Mapping[str, float | None]]],
    inventory: Any,
) -> dict[GroupKey, dict[str, Reliability]]:
    """Alpha and omega per group and trait, every run of every assessment (personas x runs) one respondent.

    ``values``: :func:`evaluator.store.run_values`; ``inventory``: the :class:`evaluator.inventories.Inventory`
    (its keys recode the answers).
    """
    from evaluator import fidelity, scoring

    points = inventory.scale.points
    by_trait = {t: [i.id for i in inventory.items if i.trait is t] for t in TRAITS}
    out: dict[GroupKey, dict[str, Reliability]] = {}
    for key, members in grouped.items():
        runs = [scoring.recoded_answers(inventory.items, run, points) for a in members for run in values.get(a.id, [])]
        out[key] = {t.value: r for t, r in fidelity.trait_reliability(runs, by_trait).items()}
    return out
