"""Coverage, reliability across personas and framing SD of the questionnaire scores, measured.

Drives the evaluator's administration and scoring (``evaluator.administer``) through the real vLLM
engine on the configured base model, for Direct, Prompt-Inst (10 conditions) and, when the registry
has ready adapters, SFT/DPO, in the digit (``logprob``) and label-text (``label``; ``label-norm`` is
scored from the same stored distributions) modes. Prints one JSON document and a text summary::

    python bench/psychometrics.py --inventory bfi44 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import statistics
import time
from typing import Any

from big5core.settings import get_settings
from big5core.traits import TRAITS, Level, Method
from big5personas.resolver import PersonaNotFound
from big5personas.spec import PersonaError, PersonaSpec
from big5personas.stack import build_stack
from evaluator import fidelity, scoring
from evaluator.administer import Response, administer, score
from evaluator.inventories import get_builtin
from evaluator.schemas import AssessRequest


def personas(methods: list[str], traits: list[str] | None = None) -> list[PersonaSpec]:
    out = [PersonaSpec(method=Method.DIRECT)] if "direct" in methods else []
    for method in (m for m in methods if m != "direct"):
        for trait in (t for t in TRAITS if traits is None or t.value in traits):
            for level in (Level.HIGH, Level.LOW):
                out.append(PersonaSpec.model_validate({"method": method, "traits": {trait.value: level.value}}))
    return out


def rescore(responses: list[Response], floor: float, norm: bool) -> list[Response]:
    """label-norm from a label run: the same stored distributions, the per-character one used."""
    out = []
    for r in responses:
        probs = r.option_probs_norm if norm else r.option_probs
        value, error = scoring.answer_from_options(probs, r.option_mass or 0.0, floor)
        out.append(dataclasses.replace(r, value=value, parse_error=error))
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inventory", default="bfi44")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", default="direct,prompt,sft,dpo")
    parser.add_argument("--modes", default="logprob,label")
    parser.add_argument("--vary-options", action="store_true")
    parser.add_argument("--traits", default=None, help="comma list: induce only these traits (default all five)")
    args = parser.parse_args()
    stack = build_stack(get_settings())
    engine = stack.make_engine()
    began = time.monotonic()
    engine.start()
    inventory = get_builtin(args.inventory)
    by_trait = {t: [i.id for i in inventory.items if i.trait is t] for t in TRAITS}
    check = engine.option_tokens(inventory.scale.options)
    results: dict[str, Any] = {
        "base_model": stack.base_model_id,
        "inventory": args.inventory,
        "runs": args.runs,
        "option_tokens": {"bare": check.bare, "spaced": check.spaced, "single": check.single_tokens},
        "engine_start_s": round(time.monotonic() - began, 1),
        "skipped": [],
        "modes": {},
    }
    for mode in args.modes.split(","):
        collected: dict[str, dict[str, list[tuple[Any, list[Response]]]]] = {}
        for spec in personas(args.methods.split(","), args.traits.split(",") if args.traits else None):
            try:
                resolved = stack.resolver.resolve(spec)
            except (PersonaError, PersonaNotFound) as exc:
                results["skipped"].append(f"{spec.method.value} {spec.traits}: {exc}")
                continue
            lora = None
            if resolved.adapter_name and resolved.adapter_path:
                lora = await engine.register_lora(resolved.adapter_name, resolved.adapter_path)
            request = AssessRequest(
                persona=spec,
                inventory=args.inventory,
                scoring=mode,
                runs=args.runs,
                vary_options=args.vary_options,
            )
            t0 = time.monotonic()
            responses = await administer(engine, resolved, inventory, request, lora=lora)
            print(f"{mode} {resolved.key}: {len(responses)} answers in {time.monotonic() - t0:.1f} s", flush=True)
            variants = {mode: responses}
            if mode == "label":
                variants["label-norm"] = rescore(responses, request.min_option_mass, norm=True)
            for name, rs in variants.items():
                collected.setdefault(name, {}).setdefault(resolved.method.value, []).append((resolved, rs))
        for name, by_method in collected.items():
            summary: dict[str, Any] = {}
            for method, entries in by_method.items():
                scored = [score(inventory, rs, args.runs) for _, rs in entries]
                runs_recoded = []
                for _, rs in entries:
                    per_run: list[dict[str, float | None]] = [{} for _ in range(args.runs)]
                    for r in rs:
                        per_run[r.run][r.item_id] = r.value
                    runs_recoded += [
                        scoring.recoded_answers(inventory.items, run, inventory.scale.points) for run in per_run
                    ]
                rel = fidelity.trait_reliability(runs_recoded, by_trait)
                # separation: mean over traits of |score(high) - score(low)| of the induced trait (probability-weighted
                # expected values, floor ignored, so that it exists whatever the coverage)
                gaps = []
                for trait in TRAITS:
                    sides = {}
                    for resolved, rs in entries:
                        if list(resolved.traits) == [trait.value]:
                            ev = [r.expected for r in rs if r.expected is not None and r.item_id in by_trait[trait]]
                            keyed = {i.id: i.keyed for i in inventory.items}
                            rec = [
                                scoring.recode(r.expected, keyed[r.item_id], inventory.scale.points)
                                for r in rs
                                if r.expected is not None and r.item_id in by_trait[trait]
                            ]
                            sides[resolved.traits[trait.value] > 0] = statistics.fmean(rec) if ev else None
                    if sides.get(True) is not None and sides.get(False) is not None:
                        gaps.append(sides[True] - sides[False])
                masses = [r.option_mass for _, rs in entries for r in rs if r.option_mass is not None]
                summary[method] = {
                    "n_assessments": len(entries),
                    "coverage": statistics.fmean(s.summary["coverage"] for s in scored),
                    "coverage_by_trait": {
                        t.value: statistics.fmean(s.traits[t.value]["coverage"] for s in scored) for t in TRAITS
                    },
                    "option_mass_median": statistics.median(masses) if masses else None,
                    "reliability": {t.value: dataclasses.asdict(r) for t, r in rel.items()},
                    "framing_sd_mean": {
                        t.value: _mean([s.summary["framing"]["sd_by_trait"][t.value] for s in scored]) for t in TRAITS
                    },
                    "retest_icc_mean": _mean([s.summary["retest"]["icc"] for s in scored]),
                    "gap_expected_mean": statistics.fmean(gaps) if gaps else None,
                    "gap_expected_abs_mean": statistics.fmean(abs(g) for g in gaps) if gaps else None,
                }
            results["modes"][name] = summary
    results["seconds"] = round(time.monotonic() - began, 1)
    print(json.dumps(results, indent=1, default=str))
    engine.shutdown()
    stack.close()


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(present) if present else None


if __name__ == "__main__":
    asyncio.run(main())
