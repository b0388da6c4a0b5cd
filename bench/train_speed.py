"""Training speed on the bundled model and sample data: seconds per step and tokens per second.

    python bench/train_speed.py [--steps 6] [--batch 4] [--max-length 256] [--methods sft dpo]

A benchmark, not a test: it prints what it measured, side by side, in one run.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from big5core.modelstore import resolve_base_model
from big5core.settings import get_settings
from big5core.training import TrainSpec
from trainer.train import load_dataset_rows, prepare, train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["sft", "dpo"])
    args = parser.parse_args()

    settings = get_settings()
    base = resolve_base_model(settings)
    rows_out = []
    for method in args.methods:
        spec = TrainSpec(
            method=method,
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

        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            result = train_adapter(
                spec, data, base, Path(tmp) / "out", Path(tmp) / "ckpt", progress=on_progress, show_progress_bar=False
            )
            wall = time.monotonic() - started
        steady = step_times[1:] or step_times  # the first step carries warm-up
        per_step = sum(steady) / len(steady)
        tokens = result.train_tokens
        rows_out.append((method, result.steps, per_step, tokens / result.seconds if result.seconds else 0.0, wall))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(f"\nbase model: {base}; batch {args.batch} x <= {args.max_length} tokens; LoRA r={args.rank}, fp32")
    print(f"{'method':<6} {'steps':>5} {'s/step':>8} {'tokens/s':>9} {'wall s':>7}")
    for method, steps, per_step, tps, wall in rows_out:
        print(f"{method:<6} {steps:>5} {per_step:>8.2f} {tps:>9.1f} {wall:>7.1f}")
    if len(rows_out) == 2:
        print(f"dpo/sft time per step: {rows_out[1][2] / rows_out[0][2]:.2f}x")
    print(f"peak RSS: {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
