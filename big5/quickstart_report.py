"""The quickstart's reports: the questionnaire tables and figures, and the dialogue tables (the high-low
judge gaps per method, the dose-response curves, the 2x2 mixtures beside the real replies' cross effect)."""

from __future__ import annotations

import itertools
from typing import Any

import typer

from big5.quickstart_plan import DOSE_LEVELS, MIXTURE_PAIRS, Planned, reference_path
from big5core.traits import TRAITS


def print_reports(stack: Any, plan: dict[str, Planned], inventories: list[str], judge: Any, reports: Any) -> None:
    from evaluator import report, store

    with stack.sessions() as session:
        for inventory in inventories:
            ids = {p.assessment_id for k, p in plan.items() if k.startswith(f"{inventory}:") and p.assessment_id}
            found = [a for a in store.search(session, inventory=inventory, state="done", limit=100_000) if a.id in ids]
            table = report.paper_table(found, inventory)
            typer.echo("")
            typer.echo(table.format())
            for fmt in ("svg", "png"):
                (reports / f"quickstart-{inventory}.{fmt}").write_bytes(report.table_figure(table, fmt))
            typer.echo(f"figure: {reports / f'quickstart-{inventory}.png'}")
        scores = dialogue_scores(session, plan)
        replies = dialogue_replies(session, plan)
        questionnaires = {inv: questionnaire_results(session, plan, inv) for inv in inventories}
    if not scores:
        return
    from evaluator.dialogue_report import dose_figure

    dialogue = dialogue_tables(scores, judge)
    typer.echo("")
    typer.echo(dialogue["text"])
    for family, curves in dialogue["curves"].items():
        suffix, title = ("", "composed per-trait adapters") if family == "dose-sft" else ("-steer", "steering")
        path = reports / f"quickstart-dose-response{suffix}.png"
        path.write_bytes(dose_figure(curves, title=f"Dialogue dose-response ({title})"))
        typer.echo(f"figure: {path}")
    import json

    reference = load_reference(reference_path(reports, _items_of(plan)))
    quality = quality_tables(dialogue["json"], scores, replies, reference, questionnaires)
    typer.echo("")
    typer.echo(quality["text"])
    from evaluator.quality_report import gap_quality_figure

    path = reports / "quickstart-gap-quality.png"
    path.write_bytes(gap_quality_figure(quality["rows"]))
    typer.echo(f"figure: {path}")
    dialogue["json"]["quality"] = quality["json"]
    (reports / "quickstart-dialogue.json").write_text(json.dumps(dialogue["json"], indent=2))


def _items_of(plan: dict[str, Planned]) -> int | None:
    return next((p.request.max_items for p in plan.values() if p.kind == "dialogue"), None)


def dialogue_replies(session: Any, plan: dict[str, Planned]) -> dict[str, Any]:
    """label -> the persona's replies with their stored quality (evaluator.quality_report.Replies)."""
    from evaluator import store
    from evaluator.quality_report import from_responses

    out: dict[str, Any] = {}
    for p in plan.values():
        if p.kind == "dialogue" and p.assessment_id:
            out[p.label] = from_responses(store.responses(session, p.assessment_id))
    return out


def questionnaire_results(session: Any, plan: dict[str, Planned], inventory: str) -> dict[str, dict[str, Any]]:
    """label -> {"coverage": answered share of the whole inventory, "traits": trait -> score (None: unscored)}."""
    from evaluator import report, store

    out: dict[str, dict[str, Any]] = {}
    for key, p in plan.items():
        if p.kind != "questionnaire" or not key.startswith(f"{inventory}:") or not p.assessment_id:
            continue
        a = store.get(session, p.assessment_id)
        if a.state == "done":
            out[p.label] = {"coverage": (a.summary or {}).get("coverage"), "traits": report.trait_means(a)}
    return out


def load_reference(path: Any) -> dict[str, Any] | None:
    """The real replies' quality per arm, as written by the quickstart (None when missing or stale)."""
    import json

    from evaluator.dialogue import load_dialogue_set
    from evaluator.quality_report import Replies

    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("items_hash") != load_dialogue_set().items_hash:
        return None
    return {arm: Replies(list(texts), list(q)) for arm, (texts, q) in data["arms"].items()}


def quality_tables(
    gaps_json: dict[str, Any],
    scores: dict[str, dict[str, dict[str, float]]],
    replies: dict[str, Any],
    reference: dict[str, Any] | None,
    questionnaires: dict[str, dict[str, dict[str, Any]]],
) -> dict[str, Any]:
    """Reply quality per method beside its judge gap, the quality targets, and convergent validity."""
    from evaluator.dialogue_report import mean_score
    from evaluator.quality_report import (
        convergent_validity,
        format_rows,
        format_validity,
        method_quality,
        quality_targets,
    )

    inventory = "bfi44" if "bfi44" in questionnaires else next(iter(questionnaires), None)
    found = questionnaires.get(inventory or "", {})
    coverage = {label: q["coverage"] for label, q in found.items() if q.get("coverage") is not None}
    gaps = {title: {t: cell.get("gap") for t, cell in row.items()} for title, row in gaps_json.get("gaps", {}).items()}
    rows = method_quality(replies, METHOD_ROWS, reference, coverage, gaps)
    lines = [format_rows(rows)]
    if reference is None:
        lines.append("  (no reference row: the real replies' quality was not measured for these turns)")
    targets = quality_targets(rows)
    for title, checks in targets.items():
        lines.append(
            f"  {title}: " + ", ".join(f"{name} {'met' if ok else 'MISSED'} ({v})" for name, (ok, v) in checks.items())
        )
    validity = []
    if found:
        judged = {label: {t.value: mean_score(s, t.value) for t in TRAITS} for label, s in scores.items()}
        validity = convergent_validity({k: v["traits"] for k, v in found.items()}, judged, [t.value for t in TRAITS])
        lines += ["", format_validity(validity, inventory or "")]
    return {
        "text": "\n".join(lines),
        "rows": rows,
        "json": {
            "rows": [r.to_dict() for r in rows],
            "targets": {k: {n: list(v) for n, v in c.items()} for k, c in targets.items()},
            "convergent_validity": {"inventory": inventory, "traits": [c.to_dict() for c in validity]},
        },
    }


def dialogue_scores(session: Any, plan: dict[str, Planned]) -> dict[str, dict[str, dict[str, float]]]:
    from evaluator import store
    from evaluator.dialogue_report import item_scores

    out: dict[str, dict[str, dict[str, float]]] = {}
    for p in plan.values():
        if p.kind == "dialogue" and p.assessment_id:
            assessment = store.get(session, p.assessment_id, with_scores=False)
            if assessment.state == "done":
                out[p.label] = item_scores(store.responses(session, p.assessment_id))
    return out


METHOD_ROWS: tuple[tuple[str, str], ...] = (
    ("prompt", "Prompt-Inst"),
    ("demo", "Prompt-Demo"),
    ("steer", "Steer"),
    ("sft-unified", "SFT (unified)"),
    ("sft-per-trait", "SFT (per-trait)"),
    ("dpo-unified", "DPO (unified)"),
    ("dpo-per-trait", "DPO (per-trait)"),
)


def dialogue_tables(scores: dict[str, dict[str, dict[str, float]]], judge: Any) -> dict[str, Any]:
    """The dialogue gap table, the dose-response tables and the mixtures, as text and JSON."""
    from evaluator.dialogue_report import dose_response, mean_score, mixture, paired_gap

    lines = [
        "dialogue: trait judge P(high | reply) of the induced trait, induced high / low, gap [95% CI]",
        f"{'method':<18}" + "".join(f"{t.value[:13]:>30}" for t in TRAITS),
    ]
    data: dict[str, Any] = {"gaps": {}, "dose": {}, "mixtures": []}
    if "direct" in scores:
        lines.append(f"{'Direct':<18}" + "".join(f"{_f(mean_score(scores['direct'], t.value)):>30}" for t in TRAITS))
    for prefix, title in METHOD_ROWS:
        cells = []
        row: dict[str, Any] = {}
        for trait in TRAITS:
            high, low = scores.get(f"{prefix}|{trait.value}|high"), scores.get(f"{prefix}|{trait.value}|low")
            if high is None or low is None:
                cells.append("-")
                continue
            gap = paired_gap(high, low, trait.value)
            row[trait.value] = gap.to_dict()
            ci = f"[{gap.ci[0]:+.2f},{gap.ci[1]:+.2f}]" if gap.ci else ""
            cells.append(f"{_f(gap.high)}/{_f(gap.low)} {_f(gap.gap, sign=True)}{ci}")
        if row:
            data["gaps"][title] = row
            lines.append(f"{title:<18}" + "".join(f"{c:>30}" for c in cells))
    card = judge.card.traits
    lines.append(
        f"{'real replies':<18}"
        + "".join(
            f"{'gap ' + _f(card[t.value].heldout_gap, sign=True) if t.value in card else '-':>30}" for t in TRAITS
        )
    )
    lines.append(
        f"{'judge accuracy':<18}"
        + "".join(f"{_f(card[t.value].heldout_accuracy) if t.value in card else '-':>30}" for t in TRAITS)
    )
    lines.append(f"judge {judge.card.name} sha256 {judge.card.sha256[:12]}; held-out real replies of unseen scenarios")
    curves: dict[str, list[Any]] = {}
    for family, title in (
        ("dose-sft", "composed SFT per-trait adapters"),
        ("dose-prompt", "Prompt-Inst wording"),
        ("dose-steer", "activation steering"),
    ):
        rows = []
        for trait in TRAITS:
            by_level = {
                value: scores[f"{family}|{trait.value}|{value:+.1f}"]
                for value in DOSE_LEVELS
                if f"{family}|{trait.value}|{value:+.1f}" in scores
            }
            if len(by_level) < 3:
                continue
            curve = dose_response(trait.value, by_level)
            data["dose"].setdefault(family, {})[trait.value] = curve.to_dict()
            if family in ("dose-sft", "dose-steer"):
                curves.setdefault(family, []).append(curve)
            rows.append(
                f"{trait.value:<18}"
                + "".join(f"{_f(m):>8}" for m in curve.means)
                + f"{_f(curve.level_spearman, sign=True):>10}{_f(curve.item_spearman, sign=True):>10}"
            )
        if rows:
            lines += ["", f"dose-response ({title}): judge score at requested value"]
            lines.append(
                f"{'trait':<18}" + "".join(f"{v:>+8.1f}" for v in DOSE_LEVELS) + f"{'rho lvl':>10}{'rho item':>10}"
            )
            lines += rows
    for (family, family_title), (a, b) in itertools.product(
        (("mix-sft", "composed SFT"), ("mix-steer", "steering")), MIXTURE_PAIRS
    ):
        cells = {
            (sa, sb): scores[f"{family}|{a.value}:{sa:+d}|{b.value}:{sb:+d}"]
            for sa in (1, -1)
            for sb in (1, -1)
            if f"{family}|{a.value}:{sa:+d}|{b.value}:{sb:+d}" in scores
        }
        if len(cells) < 4:
            continue
        mix = mixture(a.value, b.value, cells)
        real = {
            f"{x.value}->{y.value}": card[x.value].heldout_cross.get(y.value) if x.value in card else None
            for x, y in ((a, b), (b, a))
        }
        data["mixtures"].append({**mix.to_dict(), "real_cross": real, "method": family.removeprefix("mix-")})
        lines += [
            "",
            f"2x2 mixture {a.value} x {b.value} ({family_title}): own effect "
            f"{a.value} {_f(mix.own[a.value], sign=True)}, "
            f"{b.value} {_f(mix.own[b.value], sign=True)}; cross effect {a.value}->{b.value} "
            f"{_f(mix.cross[f'{a.value}->{b.value}'], sign=True)}, {b.value}->{a.value} "
            f"{_f(mix.cross[f'{b.value}->{a.value}'], sign=True)} "
            f"(real replies {_f(real[f'{a.value}->{b.value}'], sign=True)}, "
            f"{_f(real[f'{b.value}->{a.value}'], sign=True)})",
        ]
    return {"text": "\n".join(lines), "json": data, "curves": curves}


def _f(value: float | None, *, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if sign else f"{value:.2f}"
