"""LoRA on vLLM-CPU: upstream's per-token ops, big5's grouped ops and its segmented path (big5engine/sgmv.py).

Engines one after the other, in one run (``BIG5_VLLM_GROUPED_LORA=0`` for upstream,
``BIG5_VLLM_SGMV_LORA=0`` for the grouped ops alone): each
scores one IPIP-NEO-120 run by log-probs (120 prefills, batched; median of 2) as the base model and through a
LoRA adapter, and decodes 16 prompts x 64 tokens with four adapters mixed and the base. Prints
times and the ratios side by side. The adapter is random (rank 8, all projections): speed does not
depend on its values.

    python bench/lora_ops.py [--paths upstream,grouped,sgmv]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from big5core.generation import SamplingOptions
from big5core.prompts import ChatMessage
from big5core.settings import get_settings
from big5engine.engine import PersonaEngine
from big5engine.modelstore import resolve_base_model
from big5engine.vllm_plugin import ENV_SWITCH, SGMV_SWITCH
from evaluator.inventories import get_builtin


def random_adapter(base: str, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from big5engine.lora import LLAMA_TARGET_MODULES

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_TARGET_MODULES), init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


async def measure(engine: PersonaEngine, adapters: list[Path]) -> dict[str, float]:
    handles = [await engine.register_lora(f"bench-{i}", path) for i, path in enumerate(adapters)]
    items = get_builtin("ipip_neo_120")
    prompts = [[ChatMessage(role="user", content=items.render_item(item))] for item in items.items]

    async def scoring(lora: object) -> float:
        times = []
        for _ in range(2):
            began = time.monotonic()
            await asyncio.gather(*(engine.option_scores(p, lora=lora) for p in prompts))  # type: ignore[arg-type]
            times.append(time.monotonic() - began)
        return statistics.median(times)

    warm = SamplingOptions(max_tokens=1)
    await asyncio.gather(*(engine.generate(prompts[0], warm, lora=h) for h in handles))  # into their slots
    out = {"score base": await scoring(None), "score adapter": await scoring(handles[0])}
    chats = [[ChatMessage(role="user", content=f"Tell me about your day, part {i}.")] for i in range(16)]
    sampling = SamplingOptions(max_tokens=64, temperature=0.0)
    loras = [None, *handles]
    began = time.monotonic()
    results = await asyncio.gather(
        *(engine.generate(c, sampling, lora=loras[i % len(loras)]) for i, c in enumerate(chats))  # type: ignore[arg-type]
    )
    out["decode mixed tok/s"] = sum(r.completion_tokens for r in results) / (time.monotonic() - began)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default="upstream,grouped,sgmv", help="comma-separated; the first is the reference")
    paths = parser.parse_args().paths.split(",")
    switches = {"upstream": ("0", "0"), "grouped": ("1", "0"), "sgmv": ("1", "1")}
    settings = get_settings()
    base = resolve_base_model(settings)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [random_adapter(base, Path(tmp) / f"lora{i}", i) for i in range(4)]
        for label in paths:
            # read by the plugin in the engine's own processes
            os.environ[ENV_SWITCH], os.environ[SGMV_SWITCH] = switches[label]
            engine = PersonaEngine(base, settings.engine, work_dir=Path(tmp))
            engine.start()
            try:
                results[label] = asyncio.run(measure(engine, adapters))
            finally:
                engine.shutdown()
    reference = results[paths[0]]
    print(f"\n{'':<44}" + "".join(f"{label:>10}" for label in paths) + f"  (x faster than {paths[0]})")
    for key, unit in (("score base", "s"), ("score adapter", "s"), ("decode mixed tok/s", "")):
        name = f"{key} ({'one IPIP-NEO-120 run, ' + unit if unit else '16 x 64 tokens'})"
        values = "".join(f"{results[label][key]:>10.2f}" for label in paths)
        ratios = ", ".join(
            f"{(reference[key] / results[label][key] if unit else results[label][key] / reference[key]):.1f}x"
            for label in paths[1:]
        )
        print(f"{name:<44}{values}  {ratios}")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
