"""Trait effect against reply quality, for several decodings and trained adapter sets, side by side.

For every (decoding, adapter set) pair it runs the dialogue assessment of the ten trait-level
conditions (held-out Speaker X turns, replies judged and measured by evaluator.quality) and,
with ``--bfi``, the BFI-44 of the same personas (log-prob scoring, for the questionnaire
coverage, and the high - low difference of each trait's BFI score: does the questionnaire follow the
persona?), then prints one table row per pair: the judge gap per trait beside repetition,
the worst cell's shared opening, distinct-2, relevance (ratio to the real replies of the same
scenarios) and perplexity. Each pair's rows are appended to ``--out`` (JSON lines) as they finish.

Adapter sets name registry adapters already trained (``big5 train`` or the quickstart):
``per-trait:PREFIX`` (adapters ``PREFIX-<trait>-<level>``, e.g. ``per-trait:sft``),
``unified:NAME`` (one adapter, e.g. ``unified:dpo-unified``), ``steer`` or ``steer:NAME@V``
(activation steering with the newest or a given vector set), ``prompt`` (Prompt-Inst) or ``direct``.
Decodings are ``NAME=key:value,...`` over evaluator.schemas.AssessRequest's decoding
fields (temperature, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty).

    BIG5_DATA_DIR=/work/qs/base python bench/dialogue_quality.py --items 12 --bfi \\
        --set sft=per-trait:sft --set dpo=unified:dpo-unified \\
        --decoding greedy=temperature:0 --decoding t07=temperature:0.7 \\
        --decoding t07-rep12=temperature:0.7,repetition_penalty:1.2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from big5core.traits import TRAITS, Level


def parse_decoding(text: str) -> tuple[str, dict[str, float]]:
    name, _, body = text.partition("=")
    values = {}
    for part in filter(None, body.split(",")):
        key, _, value = part.partition(":")
        values[key.strip()] = float(value)
    return name, values


def personas(kind: str) -> dict[str, dict[str, Any]]:
    """condition label ``<trait>|<level>`` -> persona of an adapter set."""
    out: dict[str, dict[str, Any]] = {}
    if kind == "direct":
        return {"direct": {"method": "direct"}}
    for trait in TRAITS:
        for level in Level:
            key = f"{trait.value}|{level.value}"
            if kind == "prompt":
                out[key] = {"method": "prompt", "traits": {trait.value: level.value}}
            elif kind == "steer" or kind.startswith("steer:"):
                ref = kind.partition(":")[2] or None  # a vector set name@version, or the newest
                out[key] = {"method": "steer", "traits": {trait.value: level.value}, "adapter": ref}
            elif kind.startswith("per-trait:"):
                prefix = kind.split(":", 1)[1]
                method = "dpo" if prefix.startswith("dpo") else "sft"
                out[key] = {"method": method, "adapter": f"{prefix}-{trait.value}-{level.value}"}
            elif kind.startswith("unified:"):
                name = kind.split(":", 1)[1]
                method = "dpo" if name.startswith("dpo") else "sft"
                out[key] = {"method": method, "adapter": name, "traits": {trait.value: level.value}}
            else:
                raise SystemExit(f"unknown adapter set {kind!r}")
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the bench; returns the rows it appended to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", required=True, help="LABEL=per-trait:PREFIX|unified:NAME|prompt")
    parser.add_argument("--decoding", action="append", required=True, help="NAME=key:value,...")
    parser.add_argument("--items", type=int, default=12, help="held-out turns per persona (0: all)")
    parser.add_argument("--reply-tokens", type=int, default=48)
    parser.add_argument("--bfi", action="store_true", help="also BFI-44 per persona (coverage)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="JSON lines (default reports/dialogue-quality.jsonl)")
    parser.add_argument("--show", type=int, default=2, help="replies printed per adapter set and decoding")
    args = parser.parse_args(argv)

    from big5.quickstart import run_assessments
    from big5.quickstart_plan import Planned
    from big5core.settings import get_settings
    from big5personas.stack import build_stack
    from evaluator import store
    from evaluator.dialogue_report import item_scores, paired_gap
    from evaluator.inventories import DIALOGUE_INVENTORY
    from evaluator.quality_report import Replies, format_rows, from_responses, method_quality
    from evaluator.schemas import AssessRequest

    started = time.monotonic()
    settings = get_settings()
    stack = build_stack(settings)
    reports = settings.data_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    out = args.out or reports / "dialogue-quality.jsonl"
    items = args.items or None
    print(f"# dialogue quality bench {dt.date.today()}: {' '.join(sys.argv)}", flush=True)
    sets = dict(s.split("=", 1) for s in args.set)
    decodings = dict(parse_decoding(d) for d in args.decoding)
    planned: dict[tuple[str, str, str], Planned] = {}
    for set_label, kind in sets.items():
        for dec_label, decoding in decodings.items():
            for cond, persona in personas(kind).items():
                body = {"persona": persona, "inventory": DIALOGUE_INVENTORY, "max_tokens": args.reply_tokens}
                body.update(decoding)
                if items:
                    body["max_items"] = items
                req = AssessRequest.model_validate(body)
                planned[(set_label, dec_label, cond)] = Planned(cond, "dialogue", req)
            if args.bfi:
                for cond, persona in personas(kind).items():
                    req = AssessRequest.model_validate(
                        {"persona": persona, "inventory": "bfi44", "scoring": "logprob", "runs": 1}
                    )
                    planned[(set_label, "bfi", cond)] = Planned(cond, "questionnaire", req)
    reference_file = reports / f"quality-reference-{items or 'all'}.json"
    run_assessments(stack, list(planned.values()), args.concurrency, reference=reference_file, items=items)
    if not reference_file.exists():  # nothing else ran
        raise SystemExit("the reference was not measured")
    from big5.quickstart_report import load_reference

    reference = load_reference(reference_file)
    real = method_quality({}, [], reference)[0] if reference else None  # the real replies' row, once
    rows = [] if real is None else [real]
    records: list[dict[str, Any]] = []
    with stack.sessions() as session:
        coverage: dict[str, dict[str, float]] = {}
        bfi_scores: dict[str, dict[str, float | None]] = {}  # set -> condition -> BFI score of its own trait
        for (set_label, dec_label, cond), p in planned.items():
            if dec_label == "bfi" and p.assessment_id:
                summary = store.get(session, p.assessment_id).summary or {}
                coverage.setdefault(set_label, {})[cond] = summary.get("coverage")
                own = (summary.get("traits") or {}).get(cond.split("|")[0]) or {}
                bfi_scores.setdefault(set_label, {})[cond] = own.get("mean")
        for set_label in sets:
            for dec_label in decodings:
                replies: dict[str, Replies] = {}
                judged: dict[str, dict[str, dict[str, float]]] = {}
                for (s_label, d_label, cond), p in planned.items():
                    if (s_label, d_label) != (set_label, dec_label) or not p.assessment_id:
                        continue
                    responses = store.responses(session, p.assessment_id)
                    replies[f"m|{cond}"] = from_responses(responses)
                    judged[cond] = item_scores(responses)
                gaps = {}
                for trait in TRAITS:
                    high, low = judged.get(f"{trait.value}|high"), judged.get(f"{trait.value}|low")
                    if high is not None and low is not None:
                        gaps[trait.value] = paired_gap(high, low, trait.value).gap
                cov = {f"m|{k}": v for k, v in coverage.get(set_label, {}).items() if v is not None}
                title = f"{set_label} {dec_label}"
                (row,) = method_quality(replies, [("m", title)], None, cov, {title: gaps})
                if real is not None and row.relevance is not None and real.relevance:
                    row.relevance_ratio = row.relevance / real.relevance
                rows.append(row)
                scores = bfi_scores.get(set_label, {})
                pairs = {t.value: (scores.get(f"{t.value}|high"), scores.get(f"{t.value}|low")) for t in TRAITS}
                bfi_gaps = {t: hi - lo for t, (hi, lo) in pairs.items() if hi is not None and lo is not None}
                record = {"set": set_label, "decoding": dec_label, "gaps": gaps, "bfi_gaps": bfi_gaps, **row.to_dict()}
                records.append(record)
                with out.open("a") as f:
                    f.write(json.dumps({"date": str(dt.date.today()), **record, **decodings[dec_label]}) + "\n")
                for cond, rep in list(replies.items())[: args.show]:
                    for text in rep.texts[:1]:
                        print(f"  [{title} {cond}] {text!r}")
                print(
                    f"{title}: gaps "
                    + " ".join(f"{t[:1].upper()}{'-' if g is None else format(g, '+.2f')}" for t, g in gaps.items())
                    + (
                        "; BFI-44 high - low "
                        + " ".join(f"{t[:1].upper()}{g:+.2f}" for t, g in bfi_gaps.items())
                        + " ("
                        + ", ".join(f"{c} {v:.2f}" for c, v in scores.items() if v is not None)
                        + ")"
                        if bfi_gaps
                        else ""
                    ),
                    flush=True,
                )
    print("\n```\n" + format_rows(rows) + "\n```")
    print(f"dialogue quality bench finished in {time.monotonic() - started:.0f} s; rows appended to {out}")
    stack.close()
    return records


if __name__ == "__main__":
    main()
