"""Steering calibration: the layer x scale frontier of judge gap against reply quality, and the default.

For every (layer, scale) pair the newest vector set is published again with that default (a new
registry version, same vectors), and the ten trait-level steered personas run the dialogue
assessment on held-out turns through ``bench/dialogue_quality.py`` (the service's default sampling
unless ``--decoding`` says otherwise): the judge gap per trait beside repetition, the worst cell's
shared opening, relevance (ratio to the real replies) and perplexity. The default is the pair with
the largest mean gap among those inside the quality bounds of issue 27 (repeated 3-grams <= 0.10,
worst shared opening <= 0.25, relevance >= 0.8 x the real replies'); with none inside, the pair with
the best quality score. It is published last, calibrated, with the whole curve in its metadata, so
it becomes the newest set the service uses. Rows also go to ``reports/steer-calibration.jsonl``.

    BIG5_DATA_DIR=/work/qs/var python bench/steer_calibration.py --layers 6,9,12,15 --scales 2,4,8 --items 8
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from big5core.traits import TRAITS

sys.path.insert(0, str(Path(__file__).resolve().parent))

BOUNDS = {"repetition": 0.10, "worst_opening": 0.25, "relevance_ratio": 0.8}


def inside(row: dict[str, Any]) -> bool:
    return (
        (row.get("repetition") or 0.0) <= BOUNDS["repetition"]
        and (row.get("worst_opening") or 0.0) <= BOUNDS["worst_opening"]
        and (row.get("relevance_ratio") or 0.0) >= BOUNDS["relevance_ratio"]
    )


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest mean gap inside the bounds; otherwise the row closest to them."""
    ok = [r for r in rows if inside(r) and r.get("gap_mean") is not None]
    if ok:
        return max(ok, key=lambda r: r["gap_mean"])

    def excess(r: dict[str, Any]) -> float:
        return (
            max(0.0, (r.get("repetition") or 0.0) - BOUNDS["repetition"])
            + max(0.0, (r.get("worst_opening") or 0.0) - BOUNDS["worst_opening"])
            + max(0.0, BOUNDS["relevance_ratio"] - (r.get("relevance_ratio") or 0.0))
        )

    return min(rows, key=lambda r: (excess(r), -(r.get("gap_mean") or 0.0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="6,9,12,15", help="comma-separated decoder layers (one per config)")
    parser.add_argument("--scales", default="2,4,8", help="comma-separated scales (units of the mean difference)")
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--reply-tokens", type=int, default=48)
    parser.add_argument("--decoding", default=None, help="NAME=key:value,... (default: the service's decoding)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--no-publish", action="store_true", help="measure only; leave the defaults as they are")
    args = parser.parse_args()

    import dialogue_quality

    from big5core.settings import get_settings
    from trainer.steering_cli import republish

    settings = get_settings()
    configs = [(int(layer), float(scale)) for layer in args.layers.split(",") for scale in args.scales.split(",")]
    refs = {}
    for layer, scale in configs:
        refs[(layer, scale)] = republish(settings, layers=[layer], scales=dict.fromkeys(TRAITS, scale))
    argv = ["--items", str(args.items), "--reply-tokens", str(args.reply_tokens), "--show", "1"]
    argv += ["--concurrency", str(args.concurrency), "--decoding", args.decoding or "default="]
    argv += ["--out", str(settings.data_dir / "reports" / "steer-calibration.jsonl")]
    for (layer, scale), ref in refs.items():
        argv += ["--set", f"L{layer}-s{scale:g}=steer:{ref}"]
    rows = dialogue_quality.main(argv)
    curve = []
    for row in rows:
        layer, scale = row["set"][1:].split("-s")
        curve.append(
            {
                "layer": int(layer),
                "scale": float(scale),
                **{k: row.get(k) for k in ("gaps", "gap_mean", "gap_min", "repetition", "worst_opening")},
                **{k: row.get(k) for k in ("distinct_2", "relevance_ratio", "perplexity")},
                "inside_bounds": inside(row),
            }
        )
    best = choose([{**r, **c} for r, c in zip(rows, curve, strict=True)])
    layer, scale = best["layer"], best["scale"]
    print(
        f"\n# steer calibration {dt.date.today()}: chosen layer {layer}, scale {scale:g} "
        f"(gap mean {best['gap_mean']}, inside bounds: {best['inside_bounds']})"
    )
    for c in curve:
        print(json.dumps(c))
    if not args.no_publish:
        ref = republish(
            settings,
            layers=[layer],
            scales=dict.fromkeys(TRAITS, scale),
            extra={"calibration": {"date": str(dt.date.today()), "items": args.items, "curve": curve}},
        )
        print(f"published {ref} as the default vector set")


if __name__ == "__main__":
    main()
