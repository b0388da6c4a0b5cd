"""Rows/s of DExperts data generation vs plain generation, side by side in one run.

    python bench/datagen_speed.py [--rows 8] [--batch-size 4] [--max-new-tokens 48] [--expert DIR --antiexpert DIR]

Same base model (default: the bundled SmolLM2-135M-Instruct), same prompts (the turn-1 template
over the scenarios of ``../shared/data/big5chat_real/dexperts_alpha_sweep.csv`` when present,
else a few built-in ones), greedy, every row decoded to exactly ``--max-new-tokens`` tokens (stop
tokens ignored) so all variants do the same amount of work:

- ``hf-generate``: transformers' ``generate`` on the base model (the reference for plain speed);
- ``plain``: our decoder with no expert (one pass per token);
- ``dexperts``: base + one expert adapter (two passes per token, one PEFT model);
- ``dexperts+anti``: base + expert + anti-expert (three passes).

Without ``--expert`` the expert is a random LoRA (r=8, all linear layers) built in-process: speed
does not depend on the adapter's values. The ratio to ``plain`` is the cost of steering.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch

from big5core.prompts import DatagenTemplate, datagen_expert, datagen_turn1
from big5core.settings import get_settings
from big5core.traits import Level, Trait

SWEEP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "big5chat_real" / "dexperts_alpha_sweep.csv"
FALLBACK = [
    ("Ana", "Bo", "Ana helps Bo move house.", "Bo, grab the other end of this sofa, will you?"),
    ("Cy", "Di", "Cy calls Di late at night.", "Sorry to call so late, Di. Do you have a minute?"),
    ("Ed", "Flo", "Ed cooks dinner for Flo.", "Flo, dinner is ready, come and eat!"),
    ("Gus", "Hal", "Gus wins a prize at work.", "Hal, you will never guess what happened today!"),
]


def scenarios(n: int) -> list[tuple[str, str, str, str]]:
    items = list(FALLBACK)
    if SWEEP.is_file():
        with SWEEP.open() as handle:
            seen: dict[str, tuple[str, str, str, str]] = {}
            for r in csv.DictReader(handle):
                seen.setdefault(r["env_idx"], (r["personx"], r["persony"], r["narrative"], r["speaker_x"]))
        items = list(seen.values())
    return [items[i % len(items)] for i in range(n)]


def random_lora(base: str, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="base model folder (default: the configured/bundled one)")
    parser.add_argument("--expert", help="expert adapter folder (default: a random LoRA)")
    parser.add_argument("--antiexpert", help="anti-expert adapter folder (default: another random LoRA)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    from big5engine.modelstore import resolve_base_model
    from trainer.datagen.dexperts import DExperts, Sampling
    from trainer.datagen.steering import ExpertSource, SteeringModels

    base = args.base or resolve_base_model(get_settings())
    tmp = Path(tempfile.mkdtemp(prefix="datagen-bench-"))
    expert_dir = args.expert or str(random_lora(base, tmp / "expert"))
    anti_dir = args.antiexpert or str(random_lora(base, tmp / "anti"))
    models = SteeringModels(base)
    expert, anti = ExpertSource("adapter", "e", path=expert_dir), ExpertSource("adapter", "a", path=anti_dir)
    models.prepare([expert, anti])
    trait, level = Trait.EXTRAVERSION, Level.HIGH
    items = scenarios(args.rows)
    base_msgs = [datagen_turn1(x, y, s, t, trait, level) for x, y, s, t in items]
    expert_msgs = [datagen_expert(DatagenTemplate.EXPERT_PLAIN, t, trait, level) for *_, t in items]
    sampling = Sampling(0.0, 1.0, args.max_new_tokens)
    tokenizer = models.tokenizer
    print(f"device {models.device}, dtype {models.dtype}, base {base}")
    print(f"{args.rows} rows, batch {args.batch_size}, {args.max_new_tokens} tokens per row, greedy")

    def batches() -> list[slice]:
        return [slice(i, i + args.batch_size) for i in range(0, args.rows, args.batch_size)]

    def run_ours(engine: DExperts, with_expert: bool, with_anti: bool) -> None:
        for part in batches():
            engine.generate(
                base_msgs[part],
                alpha=0.5,
                expert_messages=expert_msgs[part] if with_expert else None,
                antiexpert_messages=expert_msgs[part] if with_anti else None,
                sampling=sampling,
            )

    def run_hf() -> None:
        engine = DExperts(tokenizer, models.base, device=models.device)
        for part in batches():
            ids, mask = engine.encode(base_msgs[part])
            with models.model.disable_adapter(), torch.inference_mode():
                models.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )

    never = [-1]  # no stop token: every row runs to max_new_tokens
    plain = DExperts(tokenizer, models.base, device=models.device)
    one = DExperts(tokenizer, models.base, models.member(expert), device=models.device)
    two = DExperts(tokenizer, models.base, models.member(expert), models.member(anti), device=models.device)
    for engine in (plain, one, two):
        engine.stop_ids = never
    variants = [
        ("hf-generate", run_hf),
        ("plain", lambda: run_ours(plain, False, False)),
        ("dexperts", lambda: run_ours(one, True, False)),
        ("dexperts+anti", lambda: run_ours(two, True, True)),
    ]
    run_ours(plain, False, False)  # warm-up
    results = {}
    for name, fn in variants:
        start = time.perf_counter()
        fn()
        results[name] = args.rows / (time.perf_counter() - start)
    print(f"{'variant':<15}{'rows/s':>10}{'tokens/s':>11}{'vs plain':>10}")
    for name, rate in results.items():
        ratio = rate / results["plain"]
        print(f"{name:<15}{rate:>10.3f}{rate * args.max_new_tokens:>11.1f}{ratio:>9.2f}x")


if __name__ == "__main__":
    main()
