"""Where a LoRA decode step's time goes on vLLM-CPU: base, one adapter, N adapters mixed.

    python bench/lora_profile.py [--personas 10] [--n 32] [--max-tokens 64] [--profile] [--ops upstream|big5]

Runs the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that ``torch.profiler`` sees
the model's forward, with the engine settings the service uses (fp32, eager, ``max_lora_rank`` 64).
Without ``--profile`` it prints tok/s per mode side by side; with it, the top operators by self CPU
time per mode and the Python functions (cProfile) that dominate, which separates the LoRA
arithmetic from the punica wrapper's per-step metadata and the rest of the step. The adapters are
random (rank 8, all seven projections): speed does not depend on what they learnt.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--personas", type=int, default=10)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-lora-rank", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="print operator and Python profiles per mode")
    parser.add_argument(
        "--ops", choices=["upstream", "grouped", "sgmv"], default="sgmv",
        help="upstream: plugin off; grouped: the plugin's bgmv ops alone; sgmv: the segmented wrapper path",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--modes", default="base,one,mixed")
    args = parser.parse_args()

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from big5engine.vllm_plugin import ENV_SWITCH, SGMV_SWITCH

    os.environ[ENV_SWITCH] = "0" if args.ops == "upstream" else "1"
    os.environ[SGMV_SWITCH] = "1" if args.ops == "sgmv" else "0"

    import torch
    from serve_speed import QUESTIONS, write_random_adapter  # bench/ is on sys.path as a script
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from big5core.settings import get_settings
    from big5engine.cpu import cpu_env_defaults
    from big5engine.modelstore import resolve_base_model

    settings = get_settings()
    base = resolve_base_model(settings)
    cpu_env_defaults(kv_cache_bytes=1 << 30)
    tmp = Path(tempfile.mkdtemp(prefix="big5-lora-profile-"))
    adapters = [
        write_random_adapter(Path(base), tmp / f"a{i}", seed=i + 1, rank=args.rank) for i in range(args.personas)
    ]
    llm = LLM(
        model=base, dtype="float32", enforce_eager=True, enable_lora=True, max_loras=args.personas,
        max_lora_rank=args.max_lora_rank, max_cpu_loras=args.personas + 2, kv_cache_memory_bytes=1 << 30,
        block_size=32, max_num_seqs=64, enable_prefix_caching=True, seed=0,
    )  # fmt: skip
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"}],
            tokenize=False,
            add_generation_prompt=True,
        )  # fmt: skip
        for i in range(args.n)
    ]
    requests = [LoRARequest(f"a{i}", i + 1, str(path)) for i, path in enumerate(adapters)]
    modes = {
        "base": [None] * args.n,
        "one": [requests[0]] * args.n,
        "mixed": [requests[i % len(requests)] for i in range(args.n)],
    }
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=2), lora_request=modes["mixed"], use_tqdm=False)  # slots, warm
    rates: dict[str, float] = {}
    for mode in args.modes.split(","):
        loras = modes[mode]
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = llm.generate(prompts, sampling, lora_request=loras, use_tqdm=False)
            best = min(best, time.perf_counter() - t0)
        tokens = sum(len(o.outputs[0].token_ids) for o in out)
        rates[mode] = tokens / best
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                llm.generate(prompts, sampling, lora_request=loras, use_tqdm=False)
            print(f"\n=== {mode}: operators by self CPU time ===")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
            profiler = cProfile.Profile()
            profiler.enable()
            llm.generate(prompts, sampling, lora_request=loras, use_tqdm=False)
            profiler.disable()
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(22)
            print(f"\n=== {mode}: Python functions by own time (cProfile) ===")
            print(stream.getvalue())
    print(f"\nops {args.ops}; {args.n} prompts x {args.max_tokens} tokens; load {os.getloadavg()[0]:.2f}")
    for mode, rate in rates.items():
        print(f"{mode:<6} {rate:7.1f} tok/s  {rate / rates.get('base', rate):5.2f}x base")


if __name__ == "__main__":
    main()
