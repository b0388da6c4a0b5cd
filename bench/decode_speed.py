"""Generation time per decoding on one engine, side by side in one run (issue 25: the assessment stage).

The dialogue assessment samples each reply with its own seed and the service's default penalties
(big5core.generation.DEFAULT_DECODING). This times one batch of ``--prompts`` chat prompts (real Speaker X
turns of the bundled data, ``--tokens`` tokens each, ``ignore_eos`` so every mode does equal work) under:
greedy; the default decoding with a seed per reply (the assessment's); the same unseeded; T=0.7 seeded
without penalties. Modes alternate for ``--rounds`` rounds; the median per mode and its ratio to greedy
are printed, and beside them the assessment's other engine pass over the same replies: their perplexity
under the base model (evaluator.quality.base_perplexities, prompt log-probs), each round of replies new to
the engine's prefix cache (generated under a persona's system prompt, untimed), as a new condition's are.

    python bench/decode_speed.py [--prompts 48] [--tokens 48] [--rounds 3] [--lora]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from big5core.dataset import BUNDLED_REAL, load_rows
from big5core.generation import DEFAULT_DECODING, GREEDY
from big5core.prompts import ChatMessage
from big5core.settings import get_settings
from big5engine.engine import PersonaEngine
from big5engine.modelstore import resolve_base_model
from evaluator.quality import base_perplexities

PPL = "perplexity pass (base model)"
PERSONAS = ("You are a cheerful pirate.", "You are a grumpy accountant.", "You are a shy poet.", "You are a coach.")


def speaker_x_turns(n: int) -> list[str]:
    rows = load_rows(BUNDLED_REAL)
    return [r.speaker_x for r in rows[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lora", action="store_true", help="LoRA enabled (the quickstart's and service's engine)")
    args = parser.parse_args()

    settings = get_settings()
    prompts = [[ChatMessage(role="user", content=t)] for t in speaker_x_turns(args.prompts)]
    modes = {
        "greedy": lambda i: GREEDY.sampling(args.tokens, ignore_eos=True),
        "default, seeded": lambda i: DEFAULT_DECODING.sampling(args.tokens, seed=i, ignore_eos=True),
        "default, unseeded": lambda i: DEFAULT_DECODING.sampling(args.tokens, ignore_eos=True),
        "T=0.7 seeded, no penalties": lambda i: replace(
            DEFAULT_DECODING, frequency_penalty=0.0, presence_penalty=0.0
        ).sampling(args.tokens, seed=i, ignore_eos=True),
    }
    times: dict[str, list[float]] = {m: [] for m in [*modes, PPL]}
    with tempfile.TemporaryDirectory() as tmp:
        engine = PersonaEngine(resolve_base_model(settings), settings.engine, enable_lora=args.lora, work_dir=Path(tmp))
        engine.start()
        try:
            replies: list[str] = []

            async def batch(make) -> float:  # type: ignore[no-untyped-def]
                t0 = time.monotonic()
                outs = await asyncio.gather(*(engine.generate(p, make(i)) for i, p in enumerate(prompts)))
                replies[:] = [o.text for o in outs]
                return time.monotonic() - t0

            async def go() -> None:
                await batch(modes["greedy"])  # warm-up
                for _ in range(args.rounds):
                    for name, make in modes.items():
                        times[name].append(await batch(make))
                    # as in a dialogue assessment, the replies scored are a persona's, new to the engine's
                    # prefix cache (replies generated from the very prompt scored would be cached already)
                    persona = [ChatMessage(role="system", content=PERSONAS[len(times[PPL]) % len(PERSONAS)])]
                    outs = await asyncio.gather(
                        *(engine.generate(persona + p, modes["default, seeded"](i)) for i, p in enumerate(prompts))
                    )
                    t0 = time.monotonic()
                    await base_perplexities(engine, [p[0]["content"] for p in prompts], [o.text for o in outs])
                    times[PPL].append(time.monotonic() - t0)

            asyncio.run(go())
        finally:
            engine.shutdown()
    greedy = statistics.median(times["greedy"])
    print(f"\n{args.prompts} prompts x {args.tokens} tokens, LoRA {'on' if args.lora else 'off'}, {args.rounds} rounds")
    for name, values in times.items():
        median = statistics.median(values)
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(f"{name:<28} {median:6.1f} s  ({shown})  {median / greedy:.2f}x greedy")


if __name__ == "__main__":
    main()
