"""Reasoning benchmark: the paper's 11 conditions on the lm-eval tasks, and the table beside the paper's.

Direct plus the 10 trait-level conditions (5 traits x high/low) of one method: SFT with the unified
adapter when the registry has one for the base model (the paper's setting), else Prompt-Inst (say so);
``--layout per-trait`` gives each condition its own per-trait adapter instead (named in its key).
Tasks: SocialIQA, CommonsenseQA, PIQA, TruthfulQA mc2, ARC-Easy, a stratified MMLU slice and GSM8K,
each with a per-task item limit. All conditions run at once on ONE engine (their requests share its
batches); per condition it prints the wall time and items/s, then the table (accuracy induced high /
low, the paired difference with its 95% bootstrap CI, Direct, the mean over tasks) and whether the
paper's direction (C+ > C-, A+ > A-, E- > E+, N- > N+) appears. Nothing is written to the database:
the registry is read as it is (no migration). ``--json``/``--plot`` write the table and its plot.
``--units`` appends each unit (task x condition) to a JSON-lines file as it finishes and, when the file
already holds units of the same run, skips them: a run stopped midway keeps what it measured and
resumes where it stopped (the table covers every unit in the file).

    python bench/reasoning.py --limit 40 --gsm8k-limit 5          # ~15-20 min on 2 busy cores
    python bench/reasoning.py --method prompt --tasks piqa,arc_easy --limit 100
    python bench/reasoning.py --method sft --layout per-trait --limit 40 --gsm8k-limit 5 --units runs.jsonl
    python bench/reasoning.py --direct-only --tasks piqa,arc_easy,commonsense_qa --limit 0   # whole splits, Direct
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Lock
from typing import Any

from big5core.training import LAYOUTS, PER_TRAIT, UNIFIED
from big5core.traits import ADAPTER_METHODS, Method
from big5personas.spec import persona_key

DEFAULT_TASKS = "social_iqa,commonsense_qa,piqa,truthfulqa_mc2,arc_easy,mmlu,gsm8k"
PAPER = {  # BIG5-CHAT, LLaMA-3-70B SFT, from PAPER.md: only these figures are quoted there
    ("gsm8k", "conscientiousness"): (86.4, 81.7),
    ("gsm8k", "neuroticism"): (76.0, 87.3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--limit", type=int, default=40, help="items per task (0: whole split)")
    parser.add_argument("--mmlu-limit", type=int, default=None, help="default: --limit")
    parser.add_argument("--gsm8k-limit", type=int, default=5)
    parser.add_argument("--max-gen-toks", type=int, default=128)
    parser.add_argument("--method", choices=["auto", "sft", "dpo", "prompt"], default="auto")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=UNIFIED,
        help="sft/dpo: the unified adapter (the paper's) or each condition's own per-trait adapter",
    )
    parser.add_argument("--direct-only", action="store_true")
    parser.add_argument("--chat-template", action="store_true")
    parser.add_argument("--concurrency", type=int, default=11)
    parser.add_argument("--data-dir", type=Path, default=None, help="task files (default BIG5_REASONING__DATA_DIR)")
    parser.add_argument("--units", type=Path, default=None, help="JSON-lines file of finished units (resumes)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()

    from big5core.settings import ReasoningSettings, get_settings
    from big5core.traits import TRAITS
    from big5personas.stack import build_stack
    from evaluator.reasoning.harness import evaluate_unit, lm_eval_version
    from evaluator.reasoning.lm import Big5LM
    from evaluator.reasoning.report import reasoning_table, table_figure
    from evaluator.reasoning.tasks import resolve_tasks

    overrides: dict[str, Any] = {"max_gen_toks": args.max_gen_toks, "concurrency": args.concurrency}
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    rsettings = ReasoningSettings.model_validate({**get_settings().reasoning.model_dump(), **overrides})
    tasks = resolve_tasks(args.tasks.split(","), rsettings)
    settings = get_settings()
    stack = build_stack(settings, migrate_db=False)
    method, note = pick_method(stack, args.method, args.layout)
    conditions = [persona_key(Method.DIRECT, {})]
    if not args.direct_only:
        conditions += [condition(stack, method, args.layout, t, v) for t in TRAITS for v in (1, -1)]
    started = time.monotonic()
    engine = stack.make_engine()
    engine.start()
    print(
        f"engine started in {time.monotonic() - started:.0f} s; method {method} ({note}); lm-eval {lm_eval_version()}"
    )

    def limit_of(name: str) -> int | None:
        value = {"mmlu": args.mmlu_limit, "gsm8k": args.gsm8k_limit}.get(name)
        value = args.limit if value is None else value
        return value or None

    try:
        from big5personas.spec import PersonaSpec

        models: dict[str, Big5LM] = {}
        for key in conditions:
            resolved = stack.resolver.resolve(PersonaSpec.from_model_name(key))
            models[key] = Big5LM(engine=engine, resolved=resolved)
        run = run_identity(args, rsettings, lm_eval_version())
        done = finished_units(args.units, run)
        rows: list[dict[str, Any]] = list(done.values())
        spans: dict[str, list[float]] = defaultdict(list)
        write = Lock()
        began = time.monotonic()

        def one(job: tuple[Any, str]) -> None:
            info, key = job
            t0 = time.monotonic()
            unit = evaluate_unit(
                models[key],
                info,
                rsettings,
                limit=limit_of(info.name),
                apply_chat_template=args.chat_template,
                max_gen_toks=args.max_gen_toks,
            )
            row = {
                "run": run,
                "task": unit.task,
                "method": unit.method,
                "traits": unit.resolved_persona.get("traits") or {},
                "persona_key": unit.persona_key,
                "seconds": unit.seconds,
                "scores": {i.item_id: i.score for i in unit.items},
            }
            with write:
                spans[key] += [t0 - began, time.monotonic() - began]
                rows.append(row)
                if args.units is not None:
                    with args.units.open("a") as out:
                        out.write(json.dumps(row, default=str) + "\n")
            print(f"  {info.name:<15} {key:<42} {len(unit.items):>4} items {unit.seconds:6.1f} s", flush=True)

        jobs = [(i, k) for i in tasks for k in conditions if (i.name, models[k].persona.key) not in done]
        if done:
            print(f"{len(done)} units already in {args.units}; {len(jobs)} to run")
        if jobs:
            with ThreadPoolExecutor(max_workers=min(args.concurrency, len(jobs))) as pool:
                list(pool.map(one, jobs))
        wall = time.monotonic() - began
    finally:
        engine.shutdown()
        stack.close()

    total_items = sum(len(r["scores"]) for r in rows)
    print(f"\n## Time per condition ({len(tasks)} tasks, all conditions at once on one engine)")
    print("| condition | items | wall s this run (first start to last end) | items/s | unit s (sum) |")
    print("|---|---|---|---|---|")
    for key in conditions:
        mine = [r for r in rows if r["persona_key"] == models[key].persona.key]
        n = sum(len(r["scores"]) for r in mine)
        span = max(spans[key]) - min(spans[key]) if spans[key] else 0.0
        rate = f"{n / span:.2f}" if span else "-"
        print(f"| {key} | {n} | {span:.0f} | {rate} | {sum(r['seconds'] for r in mine):.0f} |")
    print(f"| **all** | {total_items} | {wall:.0f} | - | - |")

    table = reasoning_table(rows, [t.name for t in tasks])
    print()
    print(markdown(table, method, {t.name: limit_of(t.name) for t in tasks}))
    if args.json:
        args.json.write_text(json.dumps({"table": table.to_dict(), "units": rows}, indent=1, default=str))
    if args.plot:
        args.plot.write_bytes(table_figure(table, args.plot.suffix.lstrip(".") or "svg"))
    print(f"\n(bench/reasoning.py, {dt.date.today().isoformat()}, wall {wall:.0f} s)", file=sys.stderr)


def run_identity(args: argparse.Namespace, rsettings: Any, lm_eval: str) -> dict[str, Any]:
    """What makes units comparable: a unit in ``--units`` is reused only when all of this matches."""
    return {
        "limit": args.limit,
        "mmlu_limit": args.mmlu_limit,
        "gsm8k_limit": args.gsm8k_limit,
        "max_gen_toks": args.max_gen_toks,
        "chat_template": args.chat_template,
        "source": rsettings.source,
        "lm_eval": lm_eval,
    }


def finished_units(path: Path | None, run: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Units already in the JSON-lines file for this run, by (task, persona key). A torn last line (the
    run killed while writing) is ignored and rerun; a unit of another run is not reused."""
    if path is None or not path.exists():
        return {}
    done: dict[tuple[str, str], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("run") == run:
            done[(row["task"], row["persona_key"])] = row
    return done


def pick_method(stack: Any, wanted: str, layout: str = "unified") -> tuple[str, str]:
    from big5personas import registry

    if wanted == "prompt":
        return "prompt", "Prompt-Inst, as asked"
    if layout == PER_TRAIT:
        if wanted == "auto":
            raise SystemExit("--layout per-trait needs --method sft or dpo")
        return wanted, "each condition's per-trait adapter"
    with stack.sessions() as session:
        for method in [m.value for m in ADAPTER_METHODS] if wanted == "auto" else [wanted]:
            row = registry.find(session, method=method, layout=UNIFIED, base_model=stack.base_model_id)
            if row is not None:
                return method, f"unified adapter {row.ref}"
    if wanted != "auto":
        raise SystemExit(f"no ready unified {wanted} adapter for {stack.base_model_id}")
    return "prompt", "no unified SFT/DPO adapter in the registry: Prompt-Inst personas instead"


def condition(stack: Any, method: str, layout: str, trait: Any, value: int) -> str:
    """The persona key of one trait-level condition; per-trait names its adapter, which the resolver
    would otherwise pass over for the unified one."""
    if method == "prompt" or layout == UNIFIED:
        return persona_key(method, {trait: value})
    from big5core.traits import Level
    from big5personas import registry

    level = Level.of(value)
    with stack.sessions() as session:  # the resolver's own per-trait lookup
        row = registry.find(
            session,
            method=method,
            layout=PER_TRAIT,
            base_model=stack.base_model_id,
            traits={trait.value: level.value},
        )
    if row is not None:
        return persona_key(method, {trait: value}, row.ref)
    raise SystemExit(f"no ready per-trait {method} adapter for {trait.value}={value}")


def markdown(table: Any, method: str, limits: dict[str, int | None]) -> str:
    from big5core.traits import TRAITS
    from evaluator.reasoning.report import SUMMARY

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    out = [
        f"Accuracy (%) induced high / low, difference high-low [paired 95% bootstrap CI], {method}; Direct.",
        "",
        "| task (items) | Direct | " + " | ".join(t.title for t in TRAITS) + " |",
        "|---|---|" + "---|" * len(TRAITS),
    ]
    cells = table.rows.get(method, {})
    for task in [*table.tasks, SUMMARY]:
        n = "" if task == SUMMARY else f" ({limits.get(task) or 'all'})"
        row = f"| {task}{n} | {pct(table.direct.get(task))} |"
        for trait in TRAITS:
            c = cells.get(task, {}).get(trait.value)
            if c is None or c.diff is None:
                row += " - |"
                continue
            ci = f" [{100 * c.ci[0]:+.1f}, {100 * c.ci[1]:+.1f}]" if c.ci else ""
            paper = PAPER.get((task, trait.value))
            quoted = f" (paper 70B: {paper[0]}/{paper[1]})" if paper else ""
            row += f" {pct(c.high)}/{pct(c.low)} {100 * c.diff:+.1f}{ci}{quoted} |"
        out.append(row)
    out.append("")
    for trait, verdict in table.direction(method).items():
        sign = "high > low" if verdict["expected_sign"] > 0 else "low > high"
        out.append(
            f"- {trait}: paper {sign}; here {verdict['verdict']} (mean diff {100 * verdict['diff']:+.1f} points)"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
