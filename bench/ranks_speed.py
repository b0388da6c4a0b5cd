"""One job trained by one process and by N ranks of `accelerate launch`, side by side in one run.

    python bench/ranks_speed.py [--ranks 2] [--examples 64] [--batch 2] [--max-length 256] [--method sft]

Both runs go through the real CLI and the job queue (a fresh SQLite file each) with the same
examples and the same global batch: one process with ``--batch x ranks`` examples per step, then
``accelerate launch --multi_gpu --num_processes RANKS -m big5.cli train`` with ``--batch`` per rank,
so both take the same optimizer steps over the same data. Each prints the training time that the
registered adapter records, examples per second and the mean training loss (the same optimisation,
so about the same loss; not bit-equal, as the loss is averaged per rank); the last line is the
speed-up.

On a machine with at least RANKS GPUs each rank gets one GPU. Without CUDA the ranks share the CPU
cores (gloo), which measures the launch path, not a speed-up: on 2 cores expect none.
A benchmark, not a test: it prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_job(command: list[str], data_dir: Path, env: dict[str, str]) -> dict[str, object]:
    """Run a `big5 train` command line; return the registered adapter's hyperparams and the wall time."""
    data_dir.mkdir(parents=True)
    models = Path(env.get("BIG5_DATA_DIR", "big5-data")).resolve() / "models"
    if models.is_dir():
        (data_dir / "models").symlink_to(models, target_is_directory=True)
    started = time.monotonic()
    done = subprocess.run(
        command,
        env={**env, "BIG5_DATA_DIR": str(data_dir), "BIG5_DATABASE_URL": ""},
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{data_dir / 'big5.sqlite3'}")
    with engine.connect() as conn:
        hyperparams, train_loss = conn.execute(text("SELECT hyperparams, train_loss FROM adapters")).one()
    engine.dispose()
    info = json.loads(hyperparams) if isinstance(hyperparams, str) else dict(hyperparams)
    return {**info, "train_loss": train_loss, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--examples", type=int, default=64, help="training examples (one epoch over them)")
    parser.add_argument("--batch", type=int, default=2, help="examples per rank per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--method", choices=["sft", "dpo"], default="sft")
    args = parser.parse_args()

    import torch

    gpus = torch.cuda.device_count()
    if gpus and gpus < args.ranks:
        sys.exit(f"{args.ranks} ranks need {args.ranks} GPUs; this machine has {gpus}")
    env = dict(os.environ)
    big5 = [sys.executable, "-m", "big5.cli"]
    spec = ["--method", args.method, "--layout", "unified", "--max-length", str(args.max_length)]
    scratch = Path(tempfile.mkdtemp(prefix="ranks-speed-"))
    config = scratch / "spec.yaml"
    config.write_text(
        f"max_train_rows: {args.examples}\nnum_train_epochs: 1\nwarmup_steps: 0\nlearning_rate: 1e-4\n"
        "save_steps: 100000\neval: false\nconditions: [openness:high]\n"
    )
    spec += ["--config", str(config)]
    results = []
    try:
        single = run_job(
            [*big5, "train", *spec, "--batch-size", str(args.batch * args.ranks)],
            scratch / "one",
            {**env, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))},
        )
        results.append(("1 process", args.batch * args.ranks, single))
        threads = max((os.cpu_count() or 1) // args.ranks, 1) if not gpus else 1
        launcher = [
            str(Path(sys.executable).with_name("accelerate")),
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(args.ranks),
            "--num_machines",
            "1",
            "--mixed_precision",
            "bf16" if gpus else "no",
            "--dynamo_backend",
            "no",
            "-m",
            "big5.cli",
        ]
        launched = run_job(
            [*launcher, "train", *spec, "--batch-size", str(args.batch)],
            scratch / "ranks",
            {**env, "OMP_NUM_THREADS": str(threads)},
        )
        results.append((f"{args.ranks} ranks", args.batch, launched))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    device = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else f"CPU, {os.cpu_count()} cores"
    print(f"\n{args.method}, {args.examples} examples, <= {args.max_length} tokens, one epoch; {device}")
    print(
        f"{'run':<10} {'world':>5} {'batch/rank':>10} {'global':>6} {'steps':>5} "
        f"{'train s':>8} {'ex/s':>7} {'wall s':>7} {'loss':>7}"
    )
    speeds = []
    for label, batch, info in results:
        seconds = float(info["seconds"])  # type: ignore[arg-type]
        speed = float(info["train_examples"]) / seconds  # type: ignore[arg-type]
        speeds.append(speed)
        print(
            f"{label:<10} {info['world_size']:>5} {batch:>10} {info['global_batch_size']:>6} {info['steps']:>5} "
            f"{seconds:>8.1f} {speed:>7.2f} {float(info['wall']):>7.1f} {float(info['train_loss']):>7.4f}"  # type: ignore[arg-type]
        )
    print(f"speed-up of {args.ranks} ranks over 1 process (training time): {speeds[1] / speeds[0]:.2f}x")


if __name__ == "__main__":
    main()
