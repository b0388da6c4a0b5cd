"""The paper's reasoning table from stored units: per task and trait, induced high vs low, and Direct.

For each method, task and trait: the accuracy (the task's primary lm-eval metric, mean over items)
when the trait is induced high and when induced low, the difference high - low with a paired 95%
bootstrap CI over the items both conditions answered (and McNemar's exact p for 0/1 metrics), and
Direct's accuracy. The summary row is the mean over tasks (its CI resamples items within each task).
The paper's finding (BIG5-CHAT, 70B SFT) is C+ > C-, A+ > A-, E- > E+, N- > N+.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from big5core.traits import METHOD_ORDER, TRAITS, Trait, single_pole
from evaluator.stats import mean_of_means_ci

SUMMARY = "mean"
PAPER_DIRECTION = {"conscientiousness": 1, "agreeableness": 1, "extraversion": -1, "neuroticism": -1}


@dataclass
class Cell:
    high: float | None = None
    low: float | None = None
    diff: float | None = None
    ci: tuple[float, float] | None = None
    p_mcnemar: float | None = None
    n_paired: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "high": self.high,
            "low": self.low,
            "diff": self.diff,
            "ci95": list(self.ci) if self.ci else None,
            "p_mcnemar": self.p_mcnemar,
            "n_paired": self.n_paired,
        }


@dataclass
class ReasoningTable:
    tasks: list[str]
    direct: dict[str, float | None] = field(default_factory=dict)  # task (and "mean") -> Direct accuracy
    rows: dict[str, dict[str, dict[str, Cell]]] = field(default_factory=dict)  # method -> task -> trait -> Cell

    def direction(self, method: str) -> dict[str, dict[str, Any]]:
        """Per trait the paper names: does the mean-over-tasks difference point its way, and is the CI clear of 0?"""
        out: dict[str, dict[str, Any]] = {}
        for trait, sign in PAPER_DIRECTION.items():
            cell = self.rows.get(method, {}).get(SUMMARY, {}).get(trait)
            if cell is None or cell.diff is None:
                continue
            agrees = cell.diff * sign > 0
            clear = cell.ci is not None and (cell.ci[0] > 0 or cell.ci[1] < 0)
            verdict = ("as the paper" if agrees else "opposite to the paper") if clear else "no clear difference"
            out[trait] = {"expected_sign": sign, "diff": cell.diff, "ci95": cell.ci, "verdict": verdict}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "direct": self.direct,
            "methods": {
                m: {task: {t: c.to_dict() for t, c in cells.items()} for task, cells in by_task.items()}
                for m, by_task in self.rows.items()
            },
            "direction": {m: self.direction(m) for m in self.rows},
        }

    def format(self) -> str:
        """Plain text: per method, one row per task (and the mean), 'high / low  diff [CI]' per trait."""
        lines = []
        for method in _methods(self.rows):
            lines.append(f"{method}: accuracy induced high / low, diff high-low [95% CI]; Direct")
            header = f"{'task':<16}{'direct':>8}" + "".join(f"{t.value[:17]:>34}" for t in TRAITS)
            lines.append(header)
            for task in [*self.tasks, SUMMARY]:
                cells = self.rows[method].get(task, {})
                row = f"{task[:15]:<16}{_pct(self.direct.get(task)):>8}"
                for trait in TRAITS:
                    c = cells.get(trait.value)
                    row += f"{_cell_text(c):>34}"
                lines.append(row)
            for trait, verdict in self.direction(method).items():
                lines.append(f"  {trait}: {verdict['verdict']} (diff {_signed(verdict['diff'])})")
        return "\n".join(lines)


def _methods(rows: Mapping[str, Any]) -> list[str]:
    return sorted(rows, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def _cell_text(c: Cell | None) -> str:
    if c is None or c.high is None or c.low is None:
        return "-"
    ci = f" [{_signed(c.ci[0])},{_signed(c.ci[1])}]" if c.ci else ""
    return f"{_pct(c.high)}/{_pct(c.low)} {_signed(c.diff)}{ci}"


def condition(method: str, traits: Mapping[str, float]) -> tuple[str, str] | None:
    """(trait, 'high'|'low') for a single trait at +-1 (:func:`~big5core.traits.single_pole`); None otherwise."""
    if method == "direct":
        return None
    pole = single_pole({Trait(k): float(v) for k, v in traits.items()})
    return None if pole is None else (pole[0].value, pole[1].value)


def mcnemar_p(high: np.ndarray, low: np.ndarray) -> float | None:
    """Exact McNemar p-value (binomial test on the discordant pairs); None unless both are 0/1."""
    from scipy.stats import binomtest

    if not (np.isin(high, (0.0, 1.0)).all() and np.isin(low, (0.0, 1.0)).all()):
        return None
    b = int(np.sum((high == 1) & (low == 0)))
    c = int(np.sum((high == 0) & (low == 1)))
    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)


def reasoning_table(units: Iterable[Mapping[str, Any]], tasks: Sequence[str] | None = None) -> ReasoningTable:
    """Build the table from units (``store.unit_scores``: task, method, traits, scores by item id).

    A later unit of the same condition and task replaces an earlier one. The high/low difference is
    paired: over the items both conditions have.
    """
    latest: dict[tuple[str, str, str, str], dict[str, float]] = {}
    direct: dict[str, dict[str, float]] = {}
    seen_tasks: list[str] = []
    for unit in units:
        task = str(unit["task"])
        if tasks and task not in tasks:
            continue
        if task not in seen_tasks:
            seen_tasks.append(task)
        if unit["method"] == "direct":
            direct[task] = dict(unit["scores"])
            continue
        pole = condition(str(unit["method"]), unit.get("traits") or {})
        if pole is not None:
            latest[(str(unit["method"]), task, *pole)] = dict(unit["scores"])
    order = [t for t in (tasks or seen_tasks) if t in seen_tasks]
    table = ReasoningTable(tasks=order)
    for task in order:
        scores = direct.get(task)
        table.direct[task] = float(np.mean(list(scores.values()))) if scores else None
    known = [table.direct[t] for t in order if table.direct.get(t) is not None]
    table.direct[SUMMARY] = float(np.mean(known)) if known and len(known) == len(order) else None
    methods = sorted({m for m, *_ in latest})
    for method in methods:
        by_task: dict[str, dict[str, Cell]] = {}
        for trait in TRAITS:
            diffs: list[np.ndarray] = []
            highs: list[float] = []
            lows: list[float] = []
            for task in order:
                high = latest.get((method, task, trait.value, "high"))
                low = latest.get((method, task, trait.value, "low"))
                cell = Cell(
                    high=float(np.mean(list(high.values()))) if high else None,
                    low=float(np.mean(list(low.values()))) if low else None,
                )
                if high and low:
                    paired = sorted(set(high) & set(low))
                    h = np.array([high[i] for i in paired])
                    lo = np.array([low[i] for i in paired])
                    cell.n_paired = len(paired)
                    if paired:
                        cell.diff = float(np.mean(h - lo))
                        cell.ci = mean_of_means_ci([h - lo])
                        cell.p_mcnemar = mcnemar_p(h, lo)
                        diffs.append(h - lo)
                        highs.append(cell.high or 0.0)
                        lows.append(cell.low or 0.0)
                by_task.setdefault(task, {})[trait.value] = cell
            if diffs and len(diffs) == len(order):
                by_task.setdefault(SUMMARY, {})[trait.value] = Cell(
                    high=float(np.mean(highs)),
                    low=float(np.mean(lows)),
                    diff=float(np.mean([d.mean() for d in diffs])),
                    ci=mean_of_means_ci(diffs),
                    n_paired=sum(len(d) for d in diffs),
                )
        table.rows[method] = by_task
    return table


def table_figure(table: ReasoningTable, fmt: str = "svg", method: str | None = None) -> bytes:
    """Per trait: the high - low accuracy difference per task (and the mean) with its 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [method] if method else _methods(table.rows)
    fig, axes = plt.subplots(
        len(methods) or 1, len(TRAITS), figsize=(3.0 * len(TRAITS), 3.2 * max(1, len(methods))), squeeze=False
    )
    labels = [*table.tasks, SUMMARY]
    for row, m in enumerate(methods):
        for col, trait in enumerate(TRAITS):
            ax = axes[row][col]
            cells = [table.rows[m].get(t, {}).get(trait.value) for t in labels]
            ys = [100 * c.diff if c and c.diff is not None else math.nan for c in cells]
            errs = np.array(
                [
                    [100 * (c.diff - c.ci[0]), 100 * (c.ci[1] - c.diff)]
                    if c and c.ci and c.diff is not None
                    else [0, 0]
                    for c in cells
                ]
            ).T
            colors = ["#555555" if t == SUMMARY else "#3b7dd8" for t in labels]
            ax.bar(range(len(labels)), ys, yerr=errs, color=colors, capsize=2)
            ax.axhline(0, color="black", linewidth=0.8)
            sign = PAPER_DIRECTION.get(trait.value)
            expected = "" if sign is None else (" (paper: +)" if sign > 0 else " (paper: -)")
            ax.set_title(f"{m}: {trait.title}{expected}", fontsize=9)
            ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
            if col == 0:
                ax.set_ylabel("high - low accuracy (points)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt)
    plt.close(fig)
    return buffer.getvalue()


__all__ = ["Cell", "ReasoningTable", "Trait", "mcnemar_p", "reasoning_table", "table_figure"]
