"""Demonstrations for the Prompt-Demo baseline, drawn as the authors drew them.

The authors' ``obtain_prompt_demo.py`` (wenkai-li/Big5-Chat) samples the ten examples of the
target trait-level at random from the dataset. Here they come from the artifact-filtered rows
(:func:`big5core.dataset.filter_artifacts`: no refusals, stage directions or duplicates become
demonstrations), sampled with a seed derived from (seed, trait, level), so the same data and seed
always give the same ten; which ten (their scenario ids), the source and the seed are recorded
with every persona that uses them.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

from big5core.dataset import BUNDLED_REAL, Row, filter_artifacts, load_rows
from big5core.traits import Level, Trait

DEMO_SEED = 0
"""Default seed of the demonstration sample."""

N_DEMOS = 10


class Demonstrations(list[str]):
    """The example replies, plus ``provenance``: where they came from (source, seed, scenario ids)."""

    provenance: tuple[dict[str, Any], ...]

    def __init__(self, texts: list[str], provenance: dict[str, Any]) -> None:
        super().__init__(texts)
        self.provenance = (provenance,)


@functools.lru_cache(maxsize=4)
def _filtered(source: str) -> tuple[Row, ...]:
    kept, _report = filter_artifacts(load_rows(source))
    return tuple(kept)


def demo_examples(
    trait: Trait, level: Level, source: str | Path = BUNDLED_REAL, k: int = N_DEMOS, seed: int = DEMO_SEED
) -> Demonstrations:
    """``k`` replies of ``trait``/``level`` drawn at random (seeded) from the filtered rows of ``source``.

    Fewer than ``k`` are returned when the arm has fewer usable replies (the resolver refuses those).
    """
    arm = [r for r in _filtered(str(source)) if r.trait is trait and r.level is level and r.speaker_y.strip()]
    arm.sort(key=lambda r: (r.scenario, r.speaker_y))  # independent of the file's row order
    rng = random.Random(f"{seed}:{trait.value}:{level.value}")
    chosen = rng.sample(arm, min(k, len(arm)))
    return Demonstrations(
        [r.speaker_y.strip() for r in chosen],
        {
            "demo_source": str(source),
            "demo_seed": seed,
            "demo_scenarios": [r.scenario for r in chosen],
            "filtered": True,
        },
    )
