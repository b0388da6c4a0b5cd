"""Serving speed on the bundled model, side by side in ONE run on ONE engine.

    python bench/serve_speed.py [--n 32] [--max-tokens 64] [--personas 10] [--ops sgmv|grouped|upstream]

Throughput (completion tokens per second of wall time, N prompts sent at once, greedy) for
  (a) the base model (method direct: LoRA index -1, handled by the big5 plugin on CPU),
  (b) one adapter for every request,
  (c) --personas different adapters mixed in one batch (one per-trait adapter per trait pole),
  (d) the same as (a) and (c) through the HTTP service (httpx -> uvicorn in this process),
  (e) one activation-steered persona (a random vector set at layer 9: big5engine/steering_hook.py),
  (f) steered, adapter and base requests mixed in one batch,
and the time to first token of /v1/generate (streaming) for a trait vector never seen before, which
includes composing its adapter, loading it into the engine and prefill. The adapters are random
(rank 8, all seven projections): speed does not depend on what they learnt.

A benchmark, not a test: it prints what it measured. Engine settings are the service defaults,
except ``max_loras`` raised to --personas so that (c) fits one batch. ``--ops`` picks the CPU LoRA
path of the engine: ``sgmv`` (default: the plugin's segmented path, big5engine/sgmv.py), ``grouped``
(the plugin's per-adapter bgmv ops alone) or ``upstream`` (vLLM's own ops; base requests then carry
the zero adapter, see big5engine/lora.py). Each run is one engine: compare paths across runs, and
modes within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUESTIONS = [
    "Describe your ideal weekend.",
    "How do you feel about meeting new people?",
    "Give me one tip for staying organised.",
    "What do you do when plans change at the last minute?",
    "Tell me about a book you would recommend and why.",
    "How do you handle criticism at work?",
    "What would you do with a free afternoon?",
    "How do you prepare for an important exam?",
]
POLES = [(trait, level) for trait in ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")
         for level in ("high", "low")]  # fmt: skip


@dataclass
class Row:
    name: str
    requests: int
    tokens: int
    seconds: float
    load: float = 0.0  # 1-minute load average right after the measurement: > CPUs means others ran too

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def write_random_adapter(model_dir: Path, out: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT LoRA folder with random nonzero A and B, written from the model config alone."""
    import numpy as np
    from safetensors.numpy import save_file

    from big5engine.lora import LLAMA_TARGET_MODULES, projection_shapes

    config = json.loads((model_dir / "config.json").read_text())
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(int(config["num_hidden_layers"])):
        for module, (fan_in, fan_out) in projection_shapes(config).items():
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            bound = 1.0 / np.sqrt(fan_in)
            tensors[f"{key}.lora_A.weight"] = rng.uniform(-bound, bound, (rank, fan_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((fan_out, rank)) * 0.08).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir), "r": rank,
        "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": list(LLAMA_TARGET_MODULES), "bias": "none",
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out


def publish_random_vectors(stack: Any, settings: Any, model_dir: Path) -> None:
    """A random steering vector set for the base model (norm 8 per layer; speed does not depend on it)."""
    import torch

    from big5core.db import transaction
    from big5core.traits import TRAITS
    from big5engine.steering import STEER_LAYOUT, check_vector_folder, model_shape, write_vector_set
    from big5personas import registry

    config = json.loads((model_dir / "config.json").read_text())
    layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    generator = torch.Generator().manual_seed(7)
    vectors = {t: torch.nn.functional.normalize(torch.randn(layers, hidden, generator=generator), dim=1) * 8
               for t in TRAITS}  # fmt: skip
    meta = {"model": model_shape(config), "num_layers": layers, "hidden_size": hidden, "layers": [9],
            "scales": {t.value: 1.0 for t in TRAITS}, "depth": layers}  # fmt: skip
    staged = registry.staging_dir(settings.adapters_dir)
    write_vector_set(staged, vectors, meta)
    with transaction(stack.sessions) as session:
        registry.publish(session, staged, settings.adapters_dir, name="bench-vectors", base_model=stack.base_model_id,
                         method="steer", layout=STEER_LAYOUT, traits={}, check=check_vector_folder)  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="prompts sent at once per measurement")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--personas", type=int, default=10, choices=range(2, 11), metavar="2..10")
    parser.add_argument("--repeat", type=int, default=4, help="interleaved rounds over the modes; fastest kept")
    parser.add_argument("--max-lora-rank", type=int, default=None, help="default: the service default (64)")
    parser.add_argument("--models-dir", type=Path, default=None, help="default: $BIG5_DATA_DIR/models or ./big5-data")
    parser.add_argument("--ops", choices=["sgmv", "grouped", "upstream"], default="sgmv", help="CPU LoRA path")
    args = parser.parse_args()

    from big5engine.vllm_plugin import ENV_SWITCH, SGMV_SWITCH

    os.environ[ENV_SWITCH] = "0" if args.ops == "upstream" else "1"  # read in the engine's own processes
    os.environ[SGMV_SWITCH] = "1" if args.ops == "sgmv" else "0"

    import httpx
    import uvicorn

    from big5core.db import transaction
    from big5core.generation import SamplingOptions
    from big5core.prompts import ChatMessage
    from big5core.settings import EngineSettings, Settings
    from big5personas import registry
    from big5personas.spec import PersonaSpec
    from big5personas.stack import build_stack
    from service.app import create_app

    models = args.models_dir or Path(os.environ.get("BIG5_DATA_DIR", "./big5-data")).resolve() / "models"
    work = Path(tempfile.mkdtemp(prefix="big5-serve-bench-"))
    (work / "models").symlink_to(models, target_is_directory=True)
    engine_settings = EngineSettings(max_loras=args.personas, max_cpu_loras=args.personas + 6)
    if args.max_lora_rank:
        engine_settings = engine_settings.model_copy(update={"max_lora_rank": args.max_lora_rank})
    settings = Settings(data_dir=work, engine=engine_settings)  # SQLite registry in the temp folder
    stack = build_stack(settings)
    model_dir = Path(stack.base_model_path)

    refs: dict[tuple[str, str], str] = {}
    for seed, (trait, level) in enumerate(POLES[: max(args.personas, 3)], start=1):
        staged = registry.staging_dir(settings.adapters_dir)
        write_random_adapter(model_dir, staged, seed)
        with transaction(stack.sessions) as session:
            row = registry.publish(
                session, staged, settings.adapters_dir, name=f"bench-{trait}-{level}", base_model=stack.base_model_id,
                method="sft", layout="per-trait", traits={trait: level}, max_rank=engine_settings.max_lora_rank,
            )  # fmt: skip
            refs[(trait, level)] = row.ref

    publish_random_vectors(stack, settings, model_dir)
    engine = stack.make_engine()
    began = time.perf_counter()
    engine.start()
    start_seconds = time.perf_counter() - began
    sampling = SamplingOptions(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)  # equal work per mode
    prompts = [[ChatMessage(role="user", content=f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})")] for i in range(args.n)]
    poles = POLES[: args.personas]
    pole_traits = [{trait: 1.0 if level == "high" else -1.0} for trait, level in poles]

    async def handles_for(traits_list: list[dict[str, float]], method: str = "sft") -> list[Any]:
        out = []
        for traits in traits_list:
            spec = PersonaSpec.model_validate({"method": method, "traits": traits})
            persona = await asyncio.to_thread(stack.resolver.resolve, spec)
            assert persona.adapter_name and persona.adapter_path
            out.append(await engine.register_lora(persona.adapter_name, persona.adapter_path))
        return out

    def fastest(measured: list[Row]) -> Row:
        return min(measured, key=lambda row: row.seconds)

    async def once(name: str, loras: list[Any]) -> Row:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(engine.generate(p, sampling, lora=loras[i % len(loras)]) for i, p in enumerate(prompts))
        )
        seconds = time.perf_counter() - t0
        tokens = sum(r.completion_tokens for r in results)
        return Row(name, len(results), tokens, seconds, os.getloadavg()[0])

    async def engine_rows() -> list[Row]:
        one = await handles_for([pole_traits[0]])
        mixed = await handles_for(pole_traits)
        steered = await handles_for([{"extraversion": 0.5}], method="steer")
        modes = [
            ("(a) base (direct), engine", [None]),
            ("(b) one adapter, engine", one),
            (f"(c) {len(mixed)} personas mixed, engine", mixed),
            ("(e) one steered persona, engine", steered),
            ("(f) steered + adapter + base mixed, engine", [steered[0], one[0], None]),
        ]
        for _, loras in modes:  # warm-up: every adapter in a slot, every batch shape seen once
            await asyncio.gather(*(engine.generate(p, SamplingOptions(max_tokens=4), lora=loras[i % len(loras)])
                                   for i, p in enumerate(prompts)))  # fmt: skip
        # Rounds interleave the modes (a b c, b c a, ...), so that a burst of load from elsewhere
        # slows every mode alike instead of one; the fastest round of each mode is kept.
        measured: dict[str, list[Row]] = {name: [] for name, _ in modes}
        for round_ in range(args.repeat):
            for k in range(len(modes)):
                name, loras = modes[(round_ + k) % len(modes)]
                measured[name].append(await once(name, loras))
        return [fastest(measured[name]) for name, _ in modes]

    rows = asyncio.run(engine_rows())

    app = create_app(settings, stack=stack, engine=engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/generate"

    def body(i: int, persona: dict[str, Any], max_tokens: int = args.max_tokens) -> dict[str, Any]:
        return {"messages": prompts[i], "temperature": 0.0, "max_tokens": max_tokens, **persona}

    async def http(name: str, personas: list[dict[str, Any]]) -> Row:
        limits = httpx.Limits(max_connections=args.n + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            warm = [client.post(url, json=body(i, p, 4)) for i, p in enumerate(personas)]
            assert all(r.status_code == 200 for r in await asyncio.gather(*warm))
            measured = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                answers = await asyncio.gather(
                    *(client.post(url, json=body(i, personas[i % len(personas)])) for i in range(args.n))
                )
                seconds = time.perf_counter() - t0
                assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
                tokens = sum(r.json()["usage"]["completion_tokens"] for r in answers)
                measured.append(Row(name, len(answers), tokens, seconds, os.getloadavg()[0]))
        return fastest(measured)

    async def ttft(persona: dict[str, Any]) -> float:
        async with httpx.AsyncClient(timeout=600) as client:
            t0 = time.perf_counter()
            async with client.stream("POST", url, json={**body(0, persona, 8), "stream": True}) as response:
                assert response.status_code == 200, response.status_code
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        return time.perf_counter() - t0
        raise RuntimeError("no event")

    async def http_rows() -> tuple[list[Row], list[tuple[str, float]]]:
        measured = [
            await http("(d) base (direct), HTTP", [{"method": "direct"}]),
            await http(f"(d) {len(pole_traits)} personas mixed, HTTP", [{"traits": t} for t in pole_traits]),
        ]
        new_vector = {"openness": 0.75, "conscientiousness": -0.5, "extraversion": 0.25}
        firsts = [
            ("base (direct)", await ttft({"method": "direct"})),
            ("one adapter, loaded", await ttft({"traits": pole_traits[0]})),
            ("composed vector never seen (compose + load + prefill)", await ttft({"traits": new_vector})),
            ("same composed vector again", await ttft({"traits": new_vector})),
        ]
        return measured, firsts

    measured, firsts = asyncio.run(http_rows())
    rows += measured
    server.should_exit = True
    thread.join(timeout=60)
    engine.shutdown()
    stack.close()
    shutil.rmtree(work, ignore_errors=True)

    base_rate = rows[0].rate
    mixed_engine = rows[2].rate
    print(f"\nServing speed: bundled model, {args.n} prompts x {args.max_tokens} tokens, greedy, fp32; "
          f"engine start {start_seconds:.1f} s; max_loras {args.personas}, max_lora_rank "
          f"{engine_settings.max_lora_rank}; {os.cpu_count()} CPUs; LoRA ops {args.ops}\n")  # fmt: skip
    print(f"| {'mode':<34} | requests | tokens | seconds | tok/s | vs base | load |")
    print(f"|{'-' * 36}|----------|--------|---------|-------|---------|------|")
    for row in rows:
        print(f"| {row.name:<34} | {row.requests:>8} | {row.tokens:>6} | {row.seconds:>7.2f} "
              f"| {row.rate:>5.1f} | {row.rate / base_rate:>7.2f} | {row.load:>4.1f} |")  # fmt: skip
    print(f"(fastest of {args.repeat} interleaved rounds; load: 1-minute load average after the measurement)")
    print(f"\nHTTP vs engine: base {rows[3].rate / base_rate:.2f}, mixed {rows[4].rate / mixed_engine:.2f}")
    print("\n| time to first token (HTTP, streaming) | seconds |\n|---|---|")
    for name, seconds in firsts:
        print(f"| {name} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
