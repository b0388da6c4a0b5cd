"""The steering vectors as a monitor: a reply's projection on each trait vector beside the trait judge.

For the stored dialogue assessments (the newest ``--limit``, optionally of some methods), every
reply is read by the base model (``big5engine.activations``: the chat of the held-out turn and the
reply, mean activation over the reply's tokens after the vector set's default layer) and projected
on each trait's unit vector: a cheap trait reading, no judge needed. Printed per persona beside the
judge's P(high), with the correlation between the two per trait, over replies and over personas
(Pearson r with its 95% CI). The reading is of the reply text under the base model: a steered
persona's own activations (with its vector added) are not what is read. JSON goes to
``reports/steer-monitor.json``.

    BIG5_DATA_DIR=/work/qs/var python bench/steer_monitor.py --limit 200
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def _r(x: list[float], y: list[float]) -> dict[str, Any]:
    from scipy.stats import pearsonr

    if len(x) < 4 or np.std(x) == 0 or np.std(y) == 0:
        return {"r": None, "ci": None, "n": len(x)}
    result = pearsonr(x, y)
    ci = result.confidence_interval(0.95)
    return {"r": round(float(result.statistic), 3), "ci": [round(float(ci.low), 3), round(float(ci.high), 3)],
            "n": len(x)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200, help="newest dialogue assessments read")
    parser.add_argument("--method", action="append", default=None, help="only these methods (repeatable)")
    parser.add_argument("--layer", type=int, default=None, help="default: the vector set's first default layer")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from big5core.migrate import open_database
    from big5core.settings import get_settings
    from big5core.traits import TRAITS, Method
    from big5engine.activations import reply_means
    from big5engine.modelstore import base_model_id, resolve_base_model
    from big5engine.steering import STEER_LAYOUT, read_vector_set
    from big5personas import registry
    from evaluator import store
    from evaluator.dialogue import load_dialogue_set
    from evaluator.inventories import DIALOGUE_INVENTORY

    started = time.monotonic()
    settings = get_settings()
    turns = {item.id: item.text for item in load_dialogue_set(settings.evaluator.dialogue_source).items}
    with open_database(settings) as db, db.sessions() as session:
        row = registry.find(session, method=Method.STEER.value, layout=STEER_LAYOUT, base_model=base_model_id(settings))
        if row is None:
            raise SystemExit("no steering vectors; run 'big5 steer extract'")
        registry.verify(row)
        vectors = read_vector_set(Path(row.path))
        ref = row.ref
        personas: dict[str, list[tuple[str, str, dict[str, float]]]] = {}
        for a in store.search(session, inventory=DIALOGUE_INVENTORY, state="done", limit=args.limit):
            if args.method and a.method not in args.method:
                continue
            for r in store.responses(session, a.id):
                if r.raw_text and r.judge_scores and r.item_id in turns:
                    personas.setdefault(a.persona_key, []).append((turns[r.item_id], r.raw_text, r.judge_scores))
    layer = args.layer if args.layer is not None else vectors.layers[0]
    path = resolve_base_model(settings)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    units = torch.stack([vectors.vectors[t][layer] / vectors.vectors[t][layer].norm() for t in TRAITS])  # [5, h]
    pairs = [(turn, reply) for items in personas.values() for turn, reply, _ in items]
    if not pairs:
        raise SystemExit("no judged dialogue replies in the database")
    projections = (reply_means(model, tokenizer, pairs, layer + 1)[:, layer] @ units.T).numpy()  # [replies, 5]
    judged = np.array([[s.get(t.value, np.nan) for t in TRAITS] for items in personas.values() for *_, s in items])
    keys = [key for key, items in personas.items() for _ in items]
    per_persona = {}
    for key in personas:
        rows = [i for i, k in enumerate(keys) if k == key]
        per_persona[key] = {
            "replies": len(rows),
            "projection": {t.value: round(float(projections[rows, j].mean()), 3) for j, t in enumerate(TRAITS)},
            "judge": {t.value: round(float(np.nanmean(judged[rows, j])), 3) for j, t in enumerate(TRAITS)},
        }
    correlation = {}
    for j, t in enumerate(TRAITS):
        ok = ~np.isnan(judged[:, j])
        correlation[t.value] = {
            "replies": _r(list(projections[ok, j]), list(judged[ok, j])),
            "personas": _r(
                [p["projection"][t.value] for p in per_persona.values()],
                [p["judge"][t.value] for p in per_persona.values()],
            ),  # fmt: skip
        }
    print(f"# steer monitor {dt.date.today()}: vectors {ref}, layer {layer}, {len(pairs)} replies, "
          f"{len(per_persona)} personas")  # fmt: skip
    print(f"{'persona':60s} " + " ".join(f"{t.value[:4]:>13s}" for t in TRAITS))
    for key, p in per_persona.items():
        cells = " ".join(f"{p['projection'][t.value]:+6.2f}/{p['judge'][t.value]:.2f}" for t in TRAITS)
        print(f"{key[:60]:60s} {cells}")
    print("correlation of projection with the judge (r [95% CI]):")
    for t, c in correlation.items():
        print(f"  {t:18s} replies {c['replies']}  personas {c['personas']}")
    out = settings.data_dir / "reports" / "steer-monitor.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(dt.date.today()), "vectors": ref, "layer": layer, "personas": per_persona,
                               "correlation": correlation}, indent=2))  # fmt: skip
    print(f"steer monitor finished in {time.monotonic() - started:.0f} s; {out}")


if __name__ == "__main__":
    main()
