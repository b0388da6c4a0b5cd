"""Direct through the ``big5`` lm-eval model on the engine against lm-eval's stock ``hf`` backend.

The same local task configs, the same items and the same base model folder: per task, both accuracies,
the paired difference (ours - hf) with its 95% bootstrap CI over items, how many items the two score
differently, and the largest per-choice log-likelihood gap. ``tests/evaluator/test_reasoning_engine.py``
checks this on a 12-item slice; this bench runs whole splits (``--limit 0``) or a prefix.

    BIG5_REASONING__DATA_DIR=../shared/data/reasoning python bench/reasoning_agreement.py --limit 0
    python bench/reasoning_agreement.py --tasks arc_easy,commonsense_qa --limit 300
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="piqa,arc_easy,commonsense_qa")
    parser.add_argument("--limit", type=int, default=0, help="items per task (0: whole split)")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--data-dir", type=Path, default=None, help="task files (default BIG5_REASONING__DATA_DIR)")
    args = parser.parse_args()

    from lm_eval.models.huggingface import HFLM

    from big5core.settings import ReasoningSettings, get_settings
    from big5personas.spec import PersonaSpec
    from big5personas.stack import build_stack
    from evaluator.reasoning.harness import evaluate_unit, items_from_samples, lm_eval_version, run_lm_eval
    from evaluator.reasoning.lm import Big5LM
    from evaluator.reasoning.tasks import resolve_tasks
    from evaluator.stats import mean_of_means_ci

    overrides = {} if args.data_dir is None else {"data_dir": args.data_dir}
    rsettings = ReasoningSettings.model_validate({**get_settings().reasoning.model_dump(), **overrides})
    tasks = resolve_tasks(args.tasks.split(","), rsettings)
    limit = args.limit or None
    stack = build_stack(get_settings(), migrate_db=False)
    ours: dict[str, Any] = {}
    engine = stack.make_engine()
    t0 = time.monotonic()
    engine.start()
    print(f"engine started in {time.monotonic() - t0:.0f} s; lm-eval {lm_eval_version()}; {stack.base_model_path}")
    try:
        direct = Big5LM(engine=engine, resolved=stack.resolver.resolve(PersonaSpec.from_model_name("big5/direct")))
        for info in tasks:
            unit = evaluate_unit(direct, info, rsettings, limit=limit)
            ours[info.name] = unit
            print(f"  big5 {info.name:<15} {len(unit.items):>5} items {unit.seconds:7.1f} s", flush=True)
    finally:
        engine.shutdown()
        stack.close()

    hf = HFLM(pretrained=stack.base_model_path, dtype="float32", device="cpu", batch_size=args.hf_batch_size)
    theirs: dict[str, Any] = {}
    hf_seconds: dict[str, float] = {}
    for info in tasks:
        t0 = time.monotonic()
        _, samples = run_lm_eval(hf, info, rsettings, limit=limit)
        theirs[info.name] = {i.doc_index: i for i in items_from_samples(info, samples)}
        hf_seconds[info.name] = time.monotonic() - t0
        print(f"  hf   {info.name:<15} {len(theirs[info.name]):>5} items {hf_seconds[info.name]:7.1f} s", flush=True)

    print(
        "\n| task | items | big5 Direct | stock hf | big5 - hf [paired 95% CI] | items scored differently "
        "| max log-lik gap | big5 s | hf s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for info in tasks:
        mine = {i.doc_index: i for i in ours[info.name].items}
        other = theirs[info.name]
        common = sorted(set(mine) & set(other))
        if len(common) != len(mine) or len(common) != len(other):
            print(f"  {info.name}: item sets differ ({len(mine)} vs {len(other)}, {len(common)} shared)")
        diffs = np.array([mine[d].score - other[d].score for d in common])
        gap = max(
            (
                float(np.max(np.abs(np.array(mine[d].loglikelihoods) - np.array(other[d].loglikelihoods))))
                for d in common
                if mine[d].loglikelihoods and other[d].loglikelihoods
            ),
            default=float("nan"),
        )
        ci = mean_of_means_ci([diffs]) or (float("nan"), float("nan"))
        a = 100 * np.mean([mine[d].score for d in common])
        b = 100 * np.mean([other[d].score for d in common])
        print(
            f"| {info.name} | {len(common)} | {a:.1f} | {b:.1f} | {100 * diffs.mean():+.1f} "
            f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] | {int(np.count_nonzero(diffs))} | {gap:.1e} "
            f"| {ours[info.name].seconds:.0f} | {hf_seconds[info.name]:.0f} |"
        )
    print(f"\n(bench/reasoning_agreement.py, {dt.date.today().isoformat()})", file=sys.stderr)


if __name__ == "__main__":
    main()
