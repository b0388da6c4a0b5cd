"""Administering an inventory to a resolved persona through the engine, and scoring the answers.

One item per fresh conversation, the persona applied by the shared resolver (the same code that
/v1/generate uses). All items of a run go to the engine at once, so the engine batches them.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from big5core.persona import ResolvedPersona
from big5core.prompts import ChatMessage
from evaluator import scoring
from evaluator.inventories import Inventory, InventoryItem, norms_for
from evaluator.schemas import AssessRequest

ProgressFn = Callable[[dict[str, Any]], Awaitable[None] | None]  # awaited when it returns an awaitable

_ANSWER = re.compile(r"^\s*[\"'(\[]?\s*(\d+)(?:\s*(?:[.)\]:,\-]|$)|\s+\D)", re.DOTALL)


class Engine(Protocol):
    """What administration needs from big5core.engine.PersonaEngine."""

    async def option_scores(self, messages: list[ChatMessage], options: list[str], lora: Any = None) -> Any: ...

    async def generate(
        self, messages: list[ChatMessage], sampling: Any, lora: Any = None, request_id: str | None = None
    ) -> Any: ...


@dataclass
class Response:
    run: int
    position: int
    item_id: str
    variant: int
    raw_text: str | None = None
    option_probs: list[float] | None = None
    option_mass: float | None = None
    expected: float | None = None
    argmax: int | None = None
    value: float | None = None
    parse_error: str | None = None


@dataclass
class Scores:
    traits: dict[str, dict[str, Any]]
    facets: dict[str, dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


def parse_answer(text: str, points: int = 5) -> tuple[int | None, str | None]:
    """Strictly parse a generated answer: it must start with one integer in 1..points.

    "4", "4.", "4 - Moderately accurate" parse; "Your score is 1.", "(I) Very inaccurate", "45" and
    "" do not. Failures are returned with a reason and never replaced by a default.
    """
    match = _ANSWER.match(text)
    if match is None:
        return None, "answer does not start with a number"
    value = int(match.group(1))
    if not 1 <= value <= points:
        return None, f"number {value} is outside 1..{points}"
    return value, None


def run_plan(inventory: Inventory, request: AssessRequest) -> list[list[tuple[int, InventoryItem, int]]]:
    """For each run: (position, item, instruction variant) in presentation order."""
    rng = random.Random(request.seed)
    plan = []
    for run in range(request.runs):
        items = list(inventory.items)
        if request.shuffle:
            rng.shuffle(items)
        variant = run % inventory.n_variants if request.vary_instruction else 0
        plan.append([(position, item, variant) for position, item in enumerate(items)])
    return plan


async def administer(
    engine: Engine,
    persona: ResolvedPersona,
    inventory: Inventory,
    request: AssessRequest,
    *,
    lora: Any = None,
    progress: ProgressFn | None = None,
) -> list[Response]:
    """Every item of every run; runs go one after another, items of a run concurrently."""
    from big5core.engine import SamplingOptions

    options = list(inventory.scale.options)
    points = inventory.scale.points
    responses: list[Response] = []
    plan = run_plan(inventory, request)
    total = sum(len(run) for run in plan)

    async def one(run: int, position: int, item: InventoryItem, variant: int) -> Response:
        messages = persona.apply([ChatMessage(role="user", content=inventory.render_item(item, variant))])
        out = Response(run=run, position=position, item_id=item.id, variant=variant)
        if request.scoring == "logprob":
            result = await engine.option_scores(messages, options, lora=lora)
            out.option_probs = [float(p) for p in result.probs]
            out.option_mass = float(result.mass)
            out.expected = scoring.expected_value(out.option_probs)
            out.argmax = max(range(len(options)), key=lambda i: out.option_probs[i]) + 1  # type: ignore[index]
            out.value = out.expected
        else:
            sampling = SamplingOptions(
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                seed=request.seed * 1_000_003 + run * 10_007 + position,
            )
            result = await engine.generate(messages, sampling, lora=lora)
            out.raw_text = result.text
            value, error = parse_answer(result.text, points)
            out.value = None if value is None else float(value)
            out.parse_error = error
        return out

    for run, items in enumerate(plan):
        results = await asyncio.gather(*(one(run, pos, item, variant) for pos, item, variant in items))
        responses.extend(results)
        if progress is not None:
            reported = progress({"runs_done": run + 1, "runs": len(plan), "items_done": len(responses), "items": total})
            if inspect.isawaitable(reported):
                await reported
    return responses


def score(inventory: Inventory, responses: list[Response], runs: int) -> Scores:
    """Trait and facet scores (mean and SD across runs), alpha, z-scores, failures, option mass."""
    points = inventory.scale.points
    per_run: list[dict[str, float | None]] = [{} for _ in range(runs)]
    for r in responses:
        per_run[r.run][r.item_id] = r.value
    run_scores = [scoring.score_run(inventory.items, answers, points) for answers in per_run]
    summary = scoring.summarise(run_scores)
    alphas = scoring.trait_alphas(inventory.items, per_run, points)
    norms = norms_for(inventory.norms_key or inventory.name)
    trait_means = {t: s.mean for t, s in summary.traits.items()}
    z_traits = scoring.z_scores(trait_means, norms.traits) if norms else {}
    z_facets = scoring.z_scores({k: s.mean for k, s in summary.facets.items()}, norms.facets) if norms else {}

    failures = [r for r in responses if r.value is None]
    masses = [r.option_mass for r in responses if r.option_mass is not None]
    traits = {
        t.value: {"mean": s.mean, "sd": s.sd, "n_runs": s.n_runs, "alpha": alphas.get(t), "z": z_traits.get(t)}
        for t, s in summary.traits.items()
    }
    facets = {
        code: {"mean": s.mean, "sd": s.sd, "n_runs": s.n_runs, "alpha": None, "z": z_facets.get(code)}
        for code, s in summary.facets.items()
    }
    argmax_counts: dict[str, int] = {}
    for r in responses:
        if r.argmax is not None:
            argmax_counts[str(r.argmax)] = argmax_counts.get(str(r.argmax), 0) + 1
    info: dict[str, Any] = {
        "n_responses": len(responses),
        "n_failed": len(failures),
        "parse_failure_rate": scoring.parse_failure_rate(len(failures), len(responses)) if responses else None,
        "failures": [
            {"run": r.run, "item_id": r.item_id, "text": r.raw_text, "error": r.parse_error} for r in failures
        ][:200],
        "option_mass_mean": sum(masses) / len(masses) if masses else None,
        "option_mass_min": min(masses) if masses else None,
        "argmax_counts": argmax_counts,
        "norms": None
        if norms is None
        else {"source": norms.source_key, "group": norms.group, "provenance_verified": norms.provenance_verified},
    }
    return Scores(traits=traits, facets=facets, summary=info)
