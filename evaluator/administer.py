"""Administering an inventory to a resolved persona through the engine, and scoring the answers.

One item per fresh conversation, the persona applied by the shared resolver (the same code that
/v1/generate uses). All items of a run go to the engine at once, so the engine batches them.

Scoring modes: ``logprob`` reads the next-token probability of the option digits; ``label`` and
``label-norm`` score each option's label text ("Very inaccurate" .. "Very accurate") as a
continuation of the reply, as lm-evaluation-harness scores multiple choice (``label-norm`` divides
each log-likelihood by the label's length in characters, lm-eval's ``acc_norm``; both distributions
are stored either way); ``generate`` samples and parses. In the probability modes an item whose
options get less mass than the floor is a failure ("no answer: ..."), distribution kept, no value.

Framing (recorded per response): the item order of a run (``shuffle``), the instruction wording
(``vary_instruction``) and the answer-format wording (``vary_options``) of each run. Since every
item is its own conversation, the order can only matter in ``generate`` mode (through the seed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import math
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from big5core.prompts import (
    OPTION_WORDINGS,
    ChatMessage,
    label_answer_sentence,
    likert_scale_sentence,
    option_wording,
)
from big5core.traits import Trait
from big5personas.resolver import ResolvedPersona
from evaluator import scoring
from evaluator.inventories import Inventory, InventoryError, InventoryItem, norms_for
from evaluator.schemas import AssessRequest

ProgressFn = Callable[[dict[str, Any]], Awaitable[None] | None]  # awaited when it returns an awaitable

_ANSWER = re.compile(r"^\s*[\"'(\[]?\s*(\d+)(?:\s*(?:[.)\]:,\-]|$)|\s+\D)", re.DOTALL)


class Engine(Protocol):
    """What administration needs from big5engine.engine.PersonaEngine."""

    async def option_scores(self, messages: list[ChatMessage], options: list[str], lora: Any = None) -> Any: ...

    async def generate(
        self, messages: list[ChatMessage], sampling: Any, lora: Any = None, request_id: str | None = None
    ) -> Any: ...

    def render(self, messages: list[ChatMessage]) -> str: ...

    async def continuation_logprobs(self, prompt: str, continuations: list[str], lora: Any = None) -> list[Any]: ...


PROBABILITY_MODES = ("logprob", "label", "label-norm")


@dataclass
class Response:
    run: int
    position: int
    item_id: str
    variant: int
    option_variant: int = 0
    raw_text: str | None = None
    option_probs: list[float] | None = None
    option_logprobs: list[float | None] | None = None
    option_probs_norm: list[float] | None = None
    option_mass: float | None = None
    expected: float | None = None
    argmax: int | None = None
    value: float | None = None
    parse_error: str | None = None
    judge_scores: dict[str, float] | None = None  # the dialogue assessment: P(high | reply) per trait
    quality: dict[str, Any] | None = None  # the dialogue assessment: evaluator.quality.ReplyQuality of the reply


@dataclass
class Scores:
    traits: dict[str, dict[str, Any]]
    facets: dict[str, dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Framing:
    """How one run presents the inventory."""

    variant: int  # instruction wording
    option_variant: int  # answer-format wording
    order: str  # "fixed" or a short hash of the shuffled item order

    @property
    def key(self) -> str:
        return f"instruction={self.variant},options={self.option_variant},order={self.order}"


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


def n_option_wordings(inventory: Inventory) -> int:
    """Answer-format wordings available: all of them when every instruction carries the paper's
    answer-format sentence (which the variants replace), else only the inventory's own."""
    sentence = likert_scale_sentence(inventory.scale.anchors)
    found = all(sentence in inventory.instruction_for(v) for v in range(inventory.n_variants))
    return len(OPTION_WORDINGS) if found else 1


def render_item(inventory: Inventory, item: InventoryItem, variant: int, option_variant: int, scoring: str) -> str:
    """The user message of one item in one framing (the label-text modes ask for the label text)."""
    text = inventory.render_item(item, variant)
    anchors = inventory.scale.anchors
    sentence = likert_scale_sentence(anchors)
    if scoring in ("label", "label-norm"):
        return text.replace(sentence, label_answer_sentence(anchors))
    if option_variant:
        if sentence not in text:
            raise InventoryError(f"{inventory.name}: its instruction has no answer-format sentence to vary")
        return text.replace(sentence, option_wording(anchors, option_variant))
    return text


def run_plan(inventory: Inventory, request: AssessRequest) -> list[tuple[Framing, list[tuple[int, InventoryItem]]]]:
    """For each run: its framing and (position, item) in presentation order.

    Run r uses instruction wording r mod n_i (``vary_instruction``) and answer-format wording
    (r div n_i) mod n_o (``vary_options``; r mod n_o alone), so n_i x n_o runs cover every pair.
    """
    rng = random.Random(request.seed)
    n_i = inventory.n_variants if request.vary_instruction else 1
    n_o = n_option_wordings(inventory) if request.vary_options and request.scoring not in ("label", "label-norm") else 1
    plan = []
    for run in range(request.runs):
        items = list(inventory.items)
        order = "fixed"
        if request.shuffle:
            rng.shuffle(items)
            order = hashlib.sha256("\n".join(i.id for i in items).encode()).hexdigest()[:8]
        framing = Framing(variant=run % n_i, option_variant=(run // n_i) % n_o, order=order)
        plan.append((framing, list(enumerate(items))))
    return plan


def _softmax(logits: list[float]) -> list[float] | None:
    finite = [x for x in logits if x > -math.inf]
    if not finite:
        return None
    top = max(finite)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return [w / total for w in weights]


def _finite_or_none(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


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
    from big5core.generation import SamplingOptions

    options = list(inventory.scale.options)
    anchors = list(inventory.scale.anchors)
    points = inventory.scale.points
    floor = request.min_option_mass
    responses: list[Response] = []
    plan = run_plan(inventory, request)
    total = sum(len(items) for _, items in plan)

    def decide(out: Response, probs: list[float] | None) -> None:
        out.value, out.parse_error = scoring.answer_from_options(probs, out.option_mass or 0.0, floor)
        if probs is not None:
            out.expected = scoring.expected_value(probs)
            out.argmax = max(range(len(probs)), key=lambda i: probs[i]) + 1

    async def one(run: int, framing: Framing, position: int, item: InventoryItem) -> Response:
        text = render_item(inventory, item, framing.variant, framing.option_variant, request.scoring)
        messages = persona.apply([ChatMessage(role="user", content=text)])
        out = Response(
            run=run, position=position, item_id=item.id, variant=framing.variant, option_variant=framing.option_variant
        )
        if request.scoring == "logprob":
            result = await engine.option_scores(messages, options, lora=lora)
            out.option_probs = None if result.probs is None else [float(p) for p in result.probs]
            out.option_logprobs = _finite_or_none([math.log(p) if p > 0 else -math.inf for p in result.raw])
            out.option_mass = float(result.mass)
            decide(out, out.option_probs)
        elif request.scoring in ("label", "label-norm"):
            scores = await engine.continuation_logprobs(engine.render(messages), anchors, lora=lora)
            logprobs = [float(s.logprob) for s in scores]
            out.option_logprobs = _finite_or_none(logprobs)
            out.option_probs = _softmax(logprobs)
            out.option_probs_norm = _softmax([lp / max(1, s.n_chars) for lp, s in zip(logprobs, scores, strict=True)])
            out.option_mass = float(sum(math.exp(lp) for lp in logprobs))
            decide(out, out.option_probs_norm if request.scoring == "label-norm" else out.option_probs)
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

    for run, (framing, items) in enumerate(plan):
        results = await asyncio.gather(*(one(run, framing, pos, item) for pos, item in items))
        responses.extend(results)
        if progress is not None:
            reported = progress({"runs_done": run + 1, "runs": len(plan), "items_done": len(responses), "items": total})
            if inspect.isawaitable(reported):
                await reported
    return responses


def score(
    inventory: Inventory,
    responses: list[Response],
    runs: int,
    *,
    min_coverage: float = scoring.DEFAULT_MIN_COVERAGE,
    min_option_mass: float | None = None,
) -> Scores:
    """Trait and facet scores (mean and SD across runs), coverage, test-retest agreement across runs,
    the SD across framings, z-scores, failures and option mass.

    A trait (or facet) answered in fewer than ``min_coverage`` of its (item, run) pairs has no score.
    """
    points = inventory.scale.points
    per_run: list[dict[str, float | None]] = [{} for _ in range(runs)]
    presented: dict[int, list[tuple[int, str]]] = {}
    wording: dict[int, tuple[int, int]] = {}
    for r in responses:
        per_run[r.run][r.item_id] = r.value
        presented.setdefault(r.run, []).append((r.position, r.item_id))
        wording.setdefault(r.run, (r.variant, r.option_variant))
    natural = [i.id for i in inventory.items]
    framing_of: dict[int, str] = {}
    for run, seen in presented.items():
        order = [item_id for _, item_id in sorted(seen)]
        tag = "fixed" if order == natural else hashlib.sha256("\n".join(order).encode()).hexdigest()[:8]
        framing_of[run] = Framing(*wording[run], order=tag).key
    run_scores = [scoring.score_run(inventory.items, answers, points) for answers in per_run]
    summary = scoring.summarise(run_scores)
    coverage = scoring.trait_coverage(inventory.items, per_run)
    facet_cov = _facet_coverage(inventory, per_run)
    norms = norms_for(inventory.norms_key or inventory.name)

    def gated(mean: float | None, cov: scoring.Coverage | None) -> float | None:
        return mean if cov is None or cov.scored(min_coverage) else None

    trait_means = {t: gated(s.mean, coverage.get(t)) for t, s in summary.traits.items()}
    facet_means = {k: gated(s.mean, facet_cov.get(k)) for k, s in summary.facets.items()}
    z_traits = scoring.z_scores(trait_means, norms.traits) if norms else {}
    z_facets = scoring.z_scores(facet_means, norms.facets) if norms else {}

    def row(
        mean: float | None, s: scoring.ScoreSummary, cov: scoring.Coverage | None, z: float | None
    ) -> dict[str, Any]:
        return {
            "mean": mean,
            "sd": s.sd if mean is not None else None,
            "n_runs": s.n_runs,
            "coverage": None if cov is None else cov.share,
            "n_answered": None if cov is None else cov.answered,
            "n_asked": None if cov is None else cov.total,
            "z": z,
        }

    traits = {t.value: row(trait_means[t], s, coverage.get(t), z_traits.get(t)) for t, s in summary.traits.items()}
    facets = {k: row(facet_means[k], s, facet_cov.get(k), z_facets.get(k)) for k, s in summary.facets.items()}

    # SD of each trait's score across framings (runs with the same framing are averaged first)
    by_framing: dict[str, dict[Trait, list[float]]] = {}
    for run, rs in enumerate(run_scores):
        key = framing_of.get(run, "")
        for t, value in rs.traits.items():
            if value is not None:
                by_framing.setdefault(key, {}).setdefault(t, []).append(value)
    framing_sd = {
        t.value: scoring.framing_sd({k: sum(v[t]) / len(v[t]) if v.get(t) else None for k, v in by_framing.items()})
        if trait_means.get(t) is not None
        else None
        for t in summary.traits
    }
    retest = scoring.retest(per_run)
    retest_traits = {
        t.value: dataclasses.asdict(
            scoring.retest([{i.id: run.get(i.id) for i in inventory.items if i.trait is t} for run in per_run])
        )
        for t in summary.traits
    }

    failures = [r for r in responses if r.value is None]
    masses = [r.option_mass for r in responses if r.option_mass is not None]
    argmax_counts: dict[str, int] = {}
    for r in responses:
        if r.argmax is not None:
            argmax_counts[str(r.argmax)] = argmax_counts.get(str(r.argmax), 0) + 1
    answered = len(responses) - len(failures)
    info: dict[str, Any] = {
        "n_responses": len(responses),
        "n_failed": len(failures),
        "coverage": answered / len(responses) if responses else None,
        "coverage_by_trait": {t: v["coverage"] for t, v in traits.items()},
        "min_option_mass": min_option_mass,
        "min_coverage": min_coverage,
        "parse_failure_rate": scoring.parse_failure_rate(len(failures), len(responses)) if responses else None,
        "failures": [
            {"run": r.run, "item_id": r.item_id, "text": r.raw_text, "error": r.parse_error} for r in failures
        ][:200],
        "option_mass_mean": sum(masses) / len(masses) if masses else None,
        "option_mass_min": min(masses) if masses else None,
        "option_mass_max": max(masses) if masses else None,
        "argmax_counts": argmax_counts,
        "retest": {**dataclasses.asdict(retest), "by_trait": retest_traits},
        "framing": {"n_framings": len(by_framing), "framings": sorted(by_framing), "sd_by_trait": framing_sd},
        "norms": None
        if norms is None
        else {"source": norms.source_key, "group": norms.group, "provenance_verified": norms.provenance_verified},
    }
    return Scores(traits=traits, facets=facets, summary=info)


def _facet_coverage(inventory: Inventory, per_run: list[dict[str, float | None]]) -> dict[str, scoring.Coverage]:
    out: dict[str, scoring.Coverage] = {}
    for code in dict.fromkeys(i.facet for i in inventory.items if i.facet is not None):
        ids = [i.id for i in inventory.items if i.facet == code]
        answered = sum(1 for run in per_run for i in ids if run.get(i) is not None)
        out[code] = scoring.Coverage(answered=answered, total=len(ids) * len(per_run))
    return out
