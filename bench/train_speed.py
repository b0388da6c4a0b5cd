"""Training speed on the bundled model and sample data: seconds per step and tokens per second.

    python bench/train_speed.py [--steps 6] [--batch 4] [--max-length 256] [--methods sft sft-lc sft-lc-af dpo]
    python bench/train_speed.py --random-shape llama3-8b --tokenizer PATH   # a larger model's speed
    python bench/train_speed.py --random-shape llama3-8b --vocab-size 128256  # and its vocabulary's size

``sft-lc`` is SFT with the level-contrast term (``TrainSpec.level_contrast`` 1.0, trainer/level_contrast.py),
which scores every reply under the opposite level as well; ``sft-lc-af`` adds the answer-format term
(``TrainSpec.answer_format`` 1.0, trainer/answer_format.py), the quickstart's unified SFT.

``--random-shape`` times a randomly initialised model of a published architecture (weights do not
change the speed of a step) with the tokenizer of ``--tokenizer`` (default: the configured base
model), for machines where the real weights cannot be downloaded. The dtype is what training uses:
float32 on CPU, bfloat16 on a GPU. A benchmark, not a test: it prints what it measured in one run.
On a GPU the first method run carries the process's one-time start-up (kernel loading, cuBLAS
set-up) in its first steps: list a method twice (``--methods sft sft-lc dpo sft``); the ratios use
the last SFT run.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import tempfile
import time
from pathlib import Path

from big5core.settings import get_settings
from big5core.training import TrainSpec
from big5engine.modelstore import resolve_base_model
from trainer.train import load_dataset_rows, prepare, train_adapter

# Llama-architecture shapes (config.json values of the published models; vocab from the tokenizer).
SHAPES: dict[str, dict[str, int]] = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3},
    "llama3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8},
}  # fmt: skip


def random_model(shape: str, tokenizer_path: str, out: Path, vocab_size: int | None = None) -> Path:
    """Save a randomly initialised Llama of ``shape`` with ``tokenizer_path``'s tokenizer to ``out``,
    its vocabulary ``vocab_size`` rows (default: the tokenizer's)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = LlamaConfig(
        **SHAPES[shape],
        vocab_size=max(vocab_size or 0, len(tokenizer)),
        max_position_embeddings=8192,
        tie_word_embeddings=shape == "smollm2-135m",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out / "random-shape.json").write_text(json.dumps({"shape": shape, "parameters": params}))
    del model
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", nargs="+", choices=["sft", "sft-lc", "sft-lc-af", "dpo"], default=["sft", "dpo"])
    parser.add_argument("--random-shape", choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", help="tokenizer folder for --random-shape (default: the base model)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary rows of the --random-shape model")
    args = parser.parse_args()

    import torch

    on_gpu = torch.cuda.is_available()
    settings = get_settings()
    scratch = tempfile.TemporaryDirectory()
    if args.random_shape:
        made = time.monotonic()
        tokenizer = args.tokenizer or resolve_base_model(settings)
        folder = random_model(args.random_shape, tokenizer, Path(scratch.name) / "m", args.vocab_size)
        info = json.loads((folder / "random-shape.json").read_text())
        print(
            f"random {args.random_shape}: {info['parameters'] / 1e9:.2f} B parameters ({time.monotonic() - made:.0f} s)"
        )
        base = str(folder)
    else:
        base = resolve_base_model(settings)
    rows_out = []
    for method in args.methods:
        spec = TrainSpec(
            method="dpo" if method == "dpo" else "sft",
            level_contrast=1.0 if method.startswith("sft-lc") else 0.0,
            answer_format=1.0 if method == "sft-lc-af" else 0.0,
            layout="unified",
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            max_length=args.max_length,
            warmup_steps=0,
            learning_rate=1e-4,
            save_steps=10_000,
            eval=False,
            lora={"r": args.rank, "alpha": 2 * args.rank},
        )
        rows, report = load_dataset_rows(spec)
        data = prepare(spec, rows, report, None)
        step_times: list[float] = []
        last = [time.monotonic()]

        def on_progress(info: dict[str, object], times: list[float] = step_times, mark: list[float] = last) -> None:
            if "loss" not in info:
                now = time.monotonic()
                times.append(now - mark[0])
                mark[0] = now

        gc.collect()  # the previous method's model, so that each peak below is its own method's
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            result = train_adapter(
                spec, data, base, Path(tmp) / "out", Path(tmp) / "ckpt", progress=on_progress, show_progress_bar=False
            )
            wall = time.monotonic() - started
        steady = step_times[1:] or step_times  # the first step carries warm-up
        per_step = sum(steady) / len(steady)
        tokens = result.train_tokens
        gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
        rows_out.append(
            (method, result.steps, per_step, tokens / result.seconds if result.seconds else 0.0, wall, gpu_peak)
        )
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    device = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    dtype = "bf16" if on_gpu else "fp32"
    label = f"random {args.random_shape}" if args.random_shape else base
    if args.random_shape and args.vocab_size:
        label += f", vocabulary {args.vocab_size}"
    print(
        f"\nbase model: {label}; {device}; batch {args.batch} x <= {args.max_length} tokens; "
        f"LoRA r={args.rank}, {dtype}"
    )
    print(f"{'method':<6} {'steps':>5} {'s/step':>8} {'tokens/s':>9} {'wall s':>7} {'GPU GiB':>8}")
    for method, steps, per_step, tps, wall, gpu_peak in rows_out:
        print(f"{method:<6} {steps:>5} {per_step:>8.2f} {tps:>9.1f} {wall:>7.1f} {gpu_peak:>8.1f}")
    sft = next((r for r in reversed(rows_out) if r[0] == "sft"), None)
    for other in rows_out:
        if sft is not None and other[0] != "sft":
            print(f"{other[0]}/sft time per step: {other[2] / sft[2]:.2f}x")
    print(f"peak RSS: {peak_gb:.2f} GB")
    scratch.cleanup()


if __name__ == "__main__":
    main()
