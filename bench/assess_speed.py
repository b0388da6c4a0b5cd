"""Questionnaire administration speed on one engine, in one run:

  (a) log-prob scoring: one IPIP-NEO-120 run, all 120 items sent at once, one forward step each;
  (b) the paper's protocol: sample up to 128 tokens at T=0.6 and parse, ONE ITEM AT A TIME, 5 runs;
  (c) the paper's protocol with each run sent as one batch.

(b) takes ~20 minutes on 2 CPU cores; ``--paper-items N`` times N sequential items and
extrapolates to 5 x 120 (printed as such). Usage:

    python bench/assess_speed.py [--paper-items 20] [--persona-method direct]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from big5core.generation import SamplingOptions
from big5core.prompts import ChatMessage
from big5core.settings import get_settings
from big5engine.engine import PersonaEngine
from big5engine.modelstore import resolve_base_model
from evaluator.administer import parse_answer
from evaluator.inventories import get_builtin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--paper-items", type=int, default=20, help="sequential items timed for (b); 600 = all")
    parser.add_argument(
        "--lora", action="store_true", help="start the engine with LoRA enabled (the service's setting)"
    )
    args = parser.parse_args()

    settings = get_settings()
    inventory = get_builtin("ipip_neo_120")
    prompts = [[ChatMessage(role="user", content=inventory.render_item(item))] for item in inventory.items]
    with tempfile.TemporaryDirectory() as tmp:
        engine = PersonaEngine(resolve_base_model(settings), settings.engine, enable_lora=args.lora, work_dir=Path(tmp))
        t0 = time.monotonic()
        engine.start()
        start_s = time.monotonic() - t0
        try:
            results = asyncio.run(run(engine, prompts, args.paper_items))
        finally:
            engine.shutdown()
    logprob_s, logprob_runs, paper_item_s, paper_failures, paper_n, batch_s, batch_failures = results
    paper_total = paper_item_s * 5 * len(prompts)
    print(f"\nengine start: {start_s:.0f} s (not counted); LoRA {'on' if args.lora else 'off'}; items: {len(prompts)}")
    print(
        f"(a) log-prob, one batched run of 120 items: {logprob_s:.2f} s (median of {len(logprob_runs)}: "
        f"{', '.join(f'{t:.2f}' for t in logprob_runs)})"
    )
    label = "measured" if paper_n >= 5 * len(prompts) else f"extrapolated from {paper_n} sequential items"
    print(
        f"(b) paper protocol, one item at a time, 5 runs: {paper_total:.0f} s ({label}; {paper_item_s:.2f} s/item; "
        f"{paper_failures}/{paper_n} answers unparseable)"
    )
    print(
        f"(c) paper protocol, each run one batch, 5 runs: {batch_s:.0f} s "
        f"({batch_failures}/{5 * len(prompts)} unparseable)"
    )
    print(f"ratio (b)/(a): {paper_total / logprob_s:.0f}x   ratio (c)/(a): {batch_s / logprob_s:.0f}x")


async def run(engine: PersonaEngine, prompts: list[list[ChatMessage]], paper_items: int) -> tuple:
    options = ["1", "2", "3", "4", "5"]
    await asyncio.gather(*(engine.option_scores(p, options) for p in prompts[:8]))  # warm-up
    times = []
    for _ in range(3):
        t0 = time.monotonic()
        await asyncio.gather(*(engine.option_scores(p, options) for p in prompts))
        times.append(time.monotonic() - t0)
    logprob_s = statistics.median(times)

    n = min(paper_items, 5 * len(prompts))
    failures = 0
    t0 = time.monotonic()
    for i in range(n):
        out = await engine.generate(prompts[i % len(prompts)], SamplingOptions(max_tokens=128, temperature=0.6, seed=i))
        failures += parse_answer(out.text)[0] is None
    paper_item_s = (time.monotonic() - t0) / n

    t0 = time.monotonic()
    batch_failures = 0
    for run_index in range(5):
        outs = await asyncio.gather(
            *(
                engine.generate(p, SamplingOptions(max_tokens=128, temperature=0.6, seed=run_index * 1000 + j))
                for j, p in enumerate(prompts)
            )
        )
        batch_failures += sum(parse_answer(o.text)[0] is None for o in outs)
    batch_s = time.monotonic() - t0
    return logprob_s, times, paper_item_s, failures, n, batch_s, batch_failures


if __name__ == "__main__":
    main()
