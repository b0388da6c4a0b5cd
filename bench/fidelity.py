"""Fidelity benchmark: the quickstart experiment with more runs, and the statistics the paper lacks.

Trains (or reuses) the quickstart adapters (``--full``: the longer plan), then measures

questionnaires (``--runs`` runs per condition, instruction wordings cycle, log-prob scoring), per
inventory, method and trait:

- the induced-high and induced-low score of the target trait, their gap and a 95% paired bootstrap CI
  over the trait's items;
- Cronbach's alpha per trait (every run of every condition of the method one respondent);
- the off-target shift: mean |change| of the four other traits from Direct;
- per method, the Frobenius distance of the 10 conditions' 5x5 trait correlation matrix to the human
  one (Davies et al. 2015 meta-analysis, observed r);
- the target check: gap >= 1.0, CI excluding 0, and larger than Prompt-Inst's gap;

and dialogue (held-out Speaker X turns, replies scored by the trait judge):

- per method and trait, the high-low judge gap with a paired bootstrap 95% CI over the turns, beside
  the judge's held-out accuracy and the real replies' own gap (the ceiling);
- the dose-response of composed per-trait SFT adapters (and Prompt-Inst's wording) at -1 .. +1,
  with the Spearman of the level means and of every reply;
- 2x2 mixtures of two traits: each trait's own effect and its effect on the other's judge;
- the issue's targets, each marked met or missed with the number.

Writes ``<data_dir>/reports/fidelity-*.json`` and prints Markdown for docs/RESULTS.md.

    python bench/fidelity.py --runs 5                # uses BIG5_* settings like every command
    python bench/fidelity.py --skip-training --skip-questionnaires --reply-tokens 64
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from typing import Any

from big5core.traits import ADAPTER_METHODS, METHOD_ORDER, TRAITS, Level, Method, Trait
from evaluator.fidelity import Condition, Gap, MethodFidelity, analyse

METHOD_LABELS = {"direct": "Direct", "prompt": "Prompt-Inst", "demo": "Prompt-Demo", "sft": "SFT", "dpo": "DPO"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--inventory", action="append", help="default: ipip_neo_120 and bfi44")
    parser.add_argument("--method", action="append", help="default: direct prompt demo sft dpo")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-questionnaires", action="store_true")
    parser.add_argument("--full", action="store_true", help="the quickstart's --full training plan")
    parser.add_argument("--items", type=int, default=None, help="held-out turns per persona (default all)")
    parser.add_argument("--reply-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--bootstrap", type=int, default=10_000)
    parser.add_argument("--report-only", action="store_true", help="report what is stored; run nothing")
    args = parser.parse_args()

    from big5.quickstart import run_assessments
    from big5.quickstart_plan import FULL_TRAINING, QUICK_TRAINING, plan_assessments, reference_path
    from big5.quickstart_report import dialogue_tables
    from big5.quickstart_training import train_all as train_plan
    from big5core.settings import get_settings
    from big5personas.stack import build_stack
    from evaluator.judge import JudgeStore

    started = time.monotonic()
    inventories = [] if args.skip_questionnaires else (args.inventory or ["ipip_neo_120", "bfi44"])
    methods = args.method or [m.value for m in METHOD_ORDER]
    settings = get_settings()
    stack = build_stack(settings)
    print(f"# fidelity bench {dt.date.today()}: {' '.join(sys.argv)}", flush=True)
    print(f"base model {stack.base_model_id}; database {settings.resolved_database_url}", flush=True)
    judge = JudgeStore(settings.data_dir / "judges", settings.evaluator.judge_dataset).get()
    if not args.skip_training:
        plan = FULL_TRAINING if args.full else QUICK_TRAINING
        train_plan(stack, {k: v for k, v in plan.items() if v["method"] in methods})
    planned = plan_assessments(
        stack, inventories, methods, runs=args.runs, items=args.items, reply_tokens=args.reply_tokens
    )
    reports = settings.data_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_assessments(
            stack,
            [p for p in planned.values() if p.assessment_id is None],
            args.concurrency,
            reference=reference_path(reports, args.items),
            items=args.items,
        )
    for inventory in inventories:
        conditions, items_by_trait, adapters = load_conditions(stack, inventory, methods, args.runs)
        from evaluator.inventories import human_correlation_matrix

        _, human = human_correlation_matrix("r")
        direct, results = analyse(conditions, items_by_trait, human, n_boot=args.bootstrap)
        report = to_dict(inventory, args.runs, direct, results, adapters)
        (reports / f"fidelity-{inventory}.json").write_text(json.dumps(report, indent=2))
        print(markdown(inventory, args.runs, direct, results, adapters))
    from big5.quickstart_report import (
        dialogue_replies,
        dialogue_scores,
        load_reference,
        quality_tables,
        questionnaire_results,
    )

    with stack.sessions() as session:
        scores = dialogue_scores(session, planned)
        replies = dialogue_replies(session, planned)
        questionnaires = {inv: questionnaire_results(session, planned, inv) for inv in inventories}
    tables = dialogue_tables(scores, judge)
    quality = quality_tables(
        tables["json"], scores, replies, load_reference(reference_path(reports, args.items)), questionnaires
    )
    targets = dialogue_targets(tables["json"])
    (reports / "fidelity-dialogue.json").write_text(
        json.dumps(
            {**tables["json"], "quality": quality["json"], "targets": targets, "judge": judge.card.to_json()}, indent=2
        )
    )
    print("\n### Dialogue (held-out Speaker X turns, trait judge)\n")
    print("```\n" + tables["text"] + "\n```")
    print("\n### Reply quality beside the trait effect\n")
    print("```\n" + quality["text"] + "\n```")
    print("\n| target | met | measured |\n|---|---|---|")
    for name, (met, detail) in targets.items():
        print(f"| {name} | {'yes' if met else 'no'} | {detail} |")
    print(f"\nfidelity bench finished in {time.monotonic() - started:.0f} s")
    stack.close()


def dialogue_targets(data: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """The behaviour issue's targets on the dialogue measurements: (met, what was measured)."""
    gaps = data.get("gaps", {})
    out: dict[str, tuple[bool, str]] = {}

    def row(title: str) -> dict[str, Any]:
        return gaps.get(title, {})

    def gap(title: str, trait: str) -> float | None:
        return (row(title).get(trait) or {}).get("gap")

    def excl(title: str, trait: str) -> bool:
        ci = (row(title).get(trait) or {}).get("ci95")
        return bool(ci) and (ci[0] > 0 or ci[1] < 0)

    names = [t.value for t in TRAITS]
    per = "SFT (per-trait)"
    detail = ", ".join(f"{t[:1].upper()} {_f(gap(per, t), sign=True)}" for t in names)
    ok = all(
        (g := gap(per, t)) is not None
        and g >= 0.40
        and excl(per, t)
        and all(g > (gap(b, t) if gap(b, t) is not None else -1) for b in ("Prompt-Inst", "Prompt-Demo"))
        for t in names
    )
    out["SFT per-trait: gap >= 0.40, CI excl. 0, above Prompt-Inst and Prompt-Demo, every trait"] = (ok, detail)
    uni = "SFT (unified)"
    detail = ", ".join(f"{t[:1].upper()} {_f(gap(uni, t), sign=True)}" for t in names)
    out["SFT unified: gap >= 0.30 on every trait"] = (
        all((g := gap(uni, t)) is not None and g >= 0.30 for t in names),
        detail,
    )
    for title in ("DPO (unified)", "DPO (per-trait)"):
        if row(title):
            hits = [t for t in names if (g := gap(title, t)) is not None and g >= 0.30 and excl(title, t)]
            detail = ", ".join(
                f"{t[:1].upper()} {_f(gap(title, t), sign=True)}" for t in names if gap(title, t) is not None
            )
            out[f"{title}: gap >= 0.30 with CI excl. 0 on >= 3 traits"] = (len(hits) >= 3, detail)
    dose = data.get("dose", {}).get("dose-sft", {})
    if dose:
        ok = all(c["strictly_increasing"] and (c["item_spearman"] or 0) >= 0.7 for c in dose.values()) and len(
            dose
        ) == len(names)
        detail = ", ".join(
            f"{t[:1].upper()} {'incr' if c['strictly_increasing'] else 'not incr'} rho {_f(c['item_spearman'])}"
            for t, c in dose.items()
        )
        out["dose-response: strictly increasing, item Spearman >= 0.7, every trait"] = (ok, detail)
    mixes = data.get("mixtures", [])
    if mixes:
        good = [
            m
            for m in mixes
            if all(v is not None and v >= 0.25 for v in m["own"].values())
            and all(v is not None and abs(v) <= 0.10 for v in m["cross"].values())
        ]
        detail = "; ".join(
            "/".join(m["traits"])
            + ": own "
            + ", ".join(_f(v, sign=True) for v in m["own"].values())
            + " cross "
            + ", ".join(_f(v, sign=True) for v in m["cross"].values())
            + " (real replies "
            + ", ".join(_f(v, sign=True) for v in m.get("real_cross", {}).values())
            + ")"
            for m in mixes
        )
        out["mixtures: own >= 0.25, cross <= 0.10, >= 2 pairs"] = (len(good) >= 2, detail)
    return out


def load_conditions(
    stack: Any, inventory: str, methods: list[str], runs: int
) -> tuple[list[Condition], dict[Trait, list[str]], dict[str, list[str]]]:
    """Every done log-prob assessment of ``inventory`` with ``runs`` runs, as recoded answers per run."""
    from evaluator import scoring, store
    from evaluator.report import single_trait

    conditions: list[Condition] = []
    adapters: dict[str, set[str]] = {}
    with stack.sessions() as session:
        inv = store.load_inventory(session, inventory)
        items_by_trait = {t: [i.id for i in inv.items if i.trait is t] for t in TRAITS}
        found = store.search(session, inventory=inventory, state="done", limit=100_000)
        seen: set[tuple[str, str]] = set()
        for a in found:  # newest first: one assessment per (method, persona)
            if a.method not in methods or a.runs != runs or a.scoring_mode != "logprob":
                continue
            if (a.method, a.persona_key) in seen:
                continue
            pole = single_trait(a) if a.method != "direct" else None
            if a.method != "direct" and (pole is None or abs(pole[1]) != 1.0):
                continue
            seen.add((a.method, a.persona_key))
            for part in (a.resolved_persona or {}).get("parts") or []:
                adapters.setdefault(a.method, set()).add(str(part.get("adapter")))
            per_run: list[dict[str, float | None]] = [{} for _ in range(a.runs)]
            for r in store.responses(session, a.id):
                per_run[r.run][r.item_id] = r.value
            recoded = [scoring.recoded_answers(inv.items, answers, inv.scale.points) for answers in per_run]
            trait, level = (None, None) if pole is None else (pole[0], Level.of(pole[1]).value)
            conditions.append(Condition(a.method, trait, level, recoded))
    return conditions, items_by_trait, {k: sorted(v) for k, v in adapters.items()}


def target_met(results: dict[str, MethodFidelity], trait: Trait) -> dict[str, Any]:
    prompt = results.get("prompt")
    prompt_gap = prompt.gaps[trait].gap if prompt and trait in prompt.gaps else None
    out: dict[str, Any] = {}
    for method in (m.value for m in ADAPTER_METHODS):
        fid = results.get(method)
        if fid is None or trait not in fid.gaps:
            continue
        g = fid.gaps[trait]
        out[method] = bool(g.gap >= 1.0 and g.excludes_zero and (prompt_gap is None or g.gap > prompt_gap))
    return out


def to_dict(
    inventory: str,
    runs: int,
    direct: dict[Trait, float | None] | None,
    results: dict[str, MethodFidelity],
    adapters: dict[str, list[str]],
) -> dict[str, Any]:
    return {
        "date": dt.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "inventory": inventory,
        "runs": runs,
        "direct": None if direct is None else {t.value: v for t, v in direct.items()},
        "adapters": adapters,
        "methods": {
            method: {
                "gaps": {t.value: vars(g) for t, g in fid.gaps.items()},
                "alpha": {t.value: a for t, a in fid.alpha.items()},
                "off_target": {t.value: s for t, s in fid.off_target.items()},
                "correlation_distance": fid.correlation_distance,
                "correlation_note": fid.correlation_note,
            }
            for method, fid in results.items()
        },
        "target_met": {t.value: target_met(results, t) for t in TRAITS},
    }


def _f(value: float | None, digits: int = 2, *, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _gap_cells(g: Gap) -> str:
    return f"{g.high:.2f} | {g.low:.2f} | {g.gap:+.2f} [{g.ci_low:+.2f}, {g.ci_high:+.2f}]"


def markdown(
    inventory: str,
    runs: int,
    direct: dict[Trait, float | None] | None,
    results: dict[str, MethodFidelity],
    adapters: dict[str, list[str]],
) -> str:
    order = [m.value for m in METHOD_ORDER if m in results and m is not Method.DIRECT] + sorted(
        m for m in results if m not in METHOD_LABELS
    )
    lines = [f"\n### {inventory}, {runs} run(s) per condition\n"]
    if direct is not None:
        lines.append("Direct (no persona): " + ", ".join(f"{t.code} {_f(direct.get(t))}" for t in TRAITS) + "\n")
    lines.append("| method | trait | high | low | gap [95% CI] | alpha | off-target shift | target met |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for method in order:
        fid = results[method]
        for trait in TRAITS:
            g = fid.gaps.get(trait)
            met = target_met(results, trait).get(method)
            lines.append(
                f"| {METHOD_LABELS.get(method, method)} | {trait.title} | "
                + (
                    f"{g.high:.2f} | {g.low:.2f} | {g.gap:+.2f} [{g.ci_low:+.2f}, {g.ci_high:+.2f}]"
                    if g
                    else "- | - | -"
                )
                + f" | {_f(fid.alpha.get(trait))} | {_f(fid.off_target.get(trait))} | "
                + ("-" if met is None else ("yes" if met else "no"))
                + " |"
            )
    lines.append("\n| method | correlation distance to human (Frobenius, lower is better) |")
    lines.append("|---|---|")
    for method in order:
        fid = results[method]
        value = (
            _f(fid.correlation_distance)
            if fid.correlation_distance is not None
            else f"undefined: {fid.correlation_note}"
        )
        lines.append(f"| {METHOD_LABELS.get(method, method)} | {value} |")
    if adapters:
        lines.append("\nAdapters: " + "; ".join(f"{m}: {', '.join(v)}" for m, v in sorted(adapters.items())))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
