"""The paper's table shape from stored assessments, and pictures of it.

For each method and each trait: the score of the induced trait when induced high and when
induced low (mean over the matching assessments), plus Direct (no persona) as a reference.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from big5core.models import Assessment
from big5core.traits import TRAITS, Trait

METHOD_ORDER = ("direct", "prompt", "demo", "sft", "dpo")


@dataclass
class Cell:
    high: float | None = None
    low: float | None = None
    n_high: int = 0
    n_low: int = 0

    @property
    def gap(self) -> float | None:
        return None if self.high is None or self.low is None else self.high - self.low


@dataclass
class PaperTable:
    inventory: str
    direct: dict[str, float | None] = field(default_factory=dict)
    rows: dict[str, dict[str, Cell]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inventory": self.inventory,
            "direct": self.direct,
            "methods": {
                method: {
                    trait: {"high": c.high, "low": c.low, "gap": c.gap, "n_high": c.n_high, "n_low": c.n_low}
                    for trait, c in cells.items()
                }
                for method, cells in self.rows.items()
            },
        }

    def format(self) -> str:
        """A plain-text table: one row per method, 'high / low' per trait."""
        header = f"{'method':<8}" + "".join(f"{t.value[:13]:>16}" for t in TRAITS)
        lines = [f"{self.inventory}: score of the induced trait, induced high / low (1-5)", header]
        if self.direct:
            lines.append(f"{'direct':<8}" + "".join(f"{_fmt(self.direct.get(t.value)):>16}" for t in TRAITS))
        for method in sorted(self.rows, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99):
            cells = self.rows[method]
            lines.append(
                f"{method:<8}"
                + "".join(
                    f"{_fmt(cells[t.value].high) + ' / ' + _fmt(cells[t.value].low):>16}"
                    if t.value in cells
                    else f"{'-':>16}"
                    for t in TRAITS
                )
            )
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def single_pole(assessment: Assessment) -> tuple[Trait, float] | None:
    traits = (assessment.resolved_persona or {}).get("traits") or {}
    nonzero = {k: v for k, v in traits.items() if v}
    if len(nonzero) != 1:
        return None
    ((name, value),) = nonzero.items()
    return Trait(name), float(value)


def trait_means(assessment: Assessment) -> dict[str, float | None]:
    return {s.key: s.mean for s in assessment.scores if s.scope == "trait"}


def paper_table(assessments: Sequence[Assessment], inventory: str) -> PaperTable:
    """Aggregate done assessments of one inventory into the paper's high/low table."""
    table = PaperTable(inventory=inventory)
    sums: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    direct: dict[str, list[float]] = defaultdict(list)
    for a in assessments:
        if a.state != "done":
            continue
        means = trait_means(a)
        if a.method == "direct":
            for key, value in means.items():
                if value is not None:
                    direct[key].append(value)
            continue
        pole = single_pole(a)
        if pole is None or abs(pole[1]) != 1.0:
            continue
        trait, value = pole
        score = means.get(trait.value)
        if score is not None:
            sums[(a.method, trait.value, "high" if value > 0 else "low")].append(score)
    table.direct = {k: sum(v) / len(v) for k, v in direct.items()}
    for (method, trait, side), values in sums.items():
        cell = table.rows.setdefault(method, {}).setdefault(trait, Cell())
        mean = sum(values) / len(values)
        if side == "high":
            cell.high, cell.n_high = mean, len(values)
        else:
            cell.low, cell.n_low = mean, len(values)
    return table


def table_figure(table: PaperTable, fmt: str = "svg") -> bytes:
    """Grouped bars: per trait, each method's induced-high and induced-low score; Direct as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted(table.rows, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99)
    fig, axes = plt.subplots(1, len(TRAITS), figsize=(3.2 * len(TRAITS), 3.6), sharey=True)
    for ax, trait in zip(axes, TRAITS, strict=True):
        xs = range(len(methods))
        highs = [table.rows[m].get(trait.value, Cell()).high or 0 for m in methods]
        lows = [table.rows[m].get(trait.value, Cell()).low or 0 for m in methods]
        ax.bar([x - 0.2 for x in xs], highs, width=0.4, label="induced high", color="#3b7dd8")
        ax.bar([x + 0.2 for x in xs], lows, width=0.4, label="induced low", color="#d8703b")
        if table.direct.get(trait.value) is not None:
            ax.axhline(table.direct[trait.value], color="grey", linestyle="--", linewidth=1, label="direct")
        ax.set_xticks(list(xs), methods, rotation=30)
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
