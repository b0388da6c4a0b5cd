"""Steering-vector extraction: per trait and layer, the mean residual stream of high replies minus low.

For every training-side row of the data (the dialogue assessment's held-out scenarios are left out,
:func:`big5core.dataset.heldout_split`), the base model reads the chat ``[user: Speaker X, assistant:
Speaker Y]``; the activations after each decoder layer are averaged over the reply's tokens, then
over the trait's high rows and its low rows, and the vector of layer ``l`` is the difference. Forward
passes only, no training. The set is published to the registry (method ``steer``, layout ``vectors``)
with its base model, shapes, norms, data hash and sha256, like an adapter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from big5core.dataset import HELDOUT_FRACTION, HELDOUT_SEED, Row, dataset_hash, heldout_split, load_filtered
from big5core.traits import TRAITS, Level, Method, Trait
from big5engine.activations import PROMPT_TOKENS, REPLY_TOKENS, reply_means
from big5engine.steering import STEER_LAYOUT, check_vector_folder, model_shape, write_vector_set

logger = logging.getLogger(__name__)

DEFAULT_LAYERS: tuple[int, ...] = (10,)
"""Where a fresh set steers: the layer ``bench/steer_calibration.py`` chose on the bundled model (2026-12-07:
layers 6-14 x scales 2-8, then 8-12 x 2-3 on 12 held-out turns; docs/RESULTS.md). SmolLM2-135M has 30
layers; another base model should be calibrated again (the bench publishes its choice)."""
DEFAULT_SCALE = 3.0
"""The default intensity scale, in units of the high-low difference of means (the same calibration: scale 4
at layer 10 doubled the perplexity and cut relevance to 0.58x the real replies')."""
DEFAULT_SCALES: dict[Trait, float] = {Trait.EXTRAVERSION: 5.0}
"""Per-trait exceptions: extraversion's vector moves the judge least; at 5 its gap rose from +0.26 to +0.39
with relevance 0.82x (at 7: +0.43, 0.71x, outside the bound), 2026-12-07."""
ROWS_PER_ARM = 64
DEPTH_FRACTION = 2 / 3
"""Vectors are extracted for the first two thirds of the layers (steering works in the middle layers);
the decoder above them is not run."""


@dataclass(frozen=True)
class Extraction:
    vectors: dict[Trait, torch.Tensor]
    meta: dict[str, Any]


def _balanced(rows: Sequence[Row], per_arm: int | None) -> list[Row]:
    """At most ``per_arm`` rows of each trait-level (in the data's order), the others dropped."""
    if per_arm is None:
        return list(rows)
    seen: dict[tuple[Trait, Level], int] = {}
    kept = []
    for row in rows:
        key = (row.trait, row.level)
        if seen.get(key, 0) < per_arm:
            seen[key] = seen.get(key, 0) + 1
            kept.append(row)
    return kept


def extract_vectors(
    base_model_path: str,
    rows: Sequence[Row],
    *,
    batch_size: int = 16,
    rows_per_arm: int | None = ROWS_PER_ARM,
    depth: int | None = None,
) -> Extraction:
    """The five traits' vectors from ``rows`` (already the training side), and their metadata.

    ``rows_per_arm`` (None: all) bounds the rows of each trait-level; ``depth`` (default two thirds of
    the layers) is how many decoder layers get a vector; the rows of the others stay zero."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32)
    model.eval()
    usable = _balanced([r for r in rows if r.speaker_x.strip() and r.speaker_y.strip()], rows_per_arm)
    layers, hidden = int(model.config.num_hidden_layers), int(model.config.hidden_size)
    depth = max(1, min(layers - 1, depth or round(layers * DEPTH_FRACTION)))
    means = torch.zeros(len(usable), layers, hidden)
    pairs = [(r.speaker_x, r.speaker_y) for r in usable]
    means[:, :depth] = reply_means(model, tokenizer, pairs, depth, batch_size)
    vectors: dict[Trait, torch.Tensor] = {}
    counts: dict[str, dict[str, int]] = {}
    for trait in TRAITS:
        high = [i for i, r in enumerate(usable) if r.trait is trait and r.level is Level.HIGH]
        low = [i for i, r in enumerate(usable) if r.trait is trait and r.level is Level.LOW]
        if len(high) < 2 or len(low) < 2:
            raise ValueError(f"{trait.value}: {len(high)} high and {len(low)} low rows; need at least 2 of each")
        vectors[trait] = means[high].mean(dim=0) - means[low].mean(dim=0)
        counts[trait.value] = {"high": len(high), "low": len(low)}
    stream = means[:, :depth].norm(dim=2).mean(dim=0)  # the residual stream's mean norm after each layer
    meta = {
        "model": model_shape(model.config.to_dict()),
        "num_layers": layers,
        "hidden_size": hidden,
        "layers": [min(layer, depth - 1) for layer in DEFAULT_LAYERS],
        "depth": depth,
        "scales": {t.value: DEFAULT_SCALES.get(t, DEFAULT_SCALE) for t in TRAITS},
        "calibrated": False,
        "norms": {t.value: [round(float(v), 5) for v in vectors[t][:depth].norm(dim=1)] for t in TRAITS},
        "stream_norms": [round(float(v), 5) for v in stream],
        "rows": counts,
        "data_hash": dataset_hash(usable),
        "heldout": {"fraction": HELDOUT_FRACTION, "seed": HELDOUT_SEED, "excluded": True},
        "tokens": {"prompt": PROMPT_TOKENS, "reply": REPLY_TOKENS},
        "seconds": round(time.monotonic() - started, 1),
    }
    return Extraction(vectors, meta)


def training_rows(source: str | Path) -> list[Row]:
    """The rows extraction may read: the filtered data's training side (held-out scenarios removed)."""
    rows, _ = load_filtered(source)
    return heldout_split(rows)[0]


def publish_extraction(
    session: Any,
    extraction: Extraction,
    adapters_dir: Path,
    *,
    name: str,
    base_model: str,
    source: str,
    job_id: str | None = None,
) -> Any:
    """Write the set to a staging folder and publish it as a ready registry row; returns the row."""
    import shutil

    from big5personas import registry

    staging = registry.staging_dir(adapters_dir)
    try:
        write_vector_set(staging, extraction.vectors, {**extraction.meta, "base_model": base_model})
        return registry.publish(
            session,
            staging,
            adapters_dir,
            name=name,
            base_model=base_model,
            method=Method.STEER.value,
            layout=STEER_LAYOUT,
            traits={},
            hyperparams={k: extraction.meta[k] for k in ("layers", "scales", "calibrated", "num_layers", "hidden_size")}
            | {"source": source, "job_id": job_id}
            # what the dialogue assessment's held-out check reads (evaluator.dialogue.check_unseen)
            | {"dataset": source, "test_fraction": HELDOUT_FRACTION, "seed": HELDOUT_SEED},
            dataset_hash=extraction.meta["data_hash"],
            check=check_vector_folder,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
