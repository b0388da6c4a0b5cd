"""The quickstart's plan: what it trains (the training plans) and what it assesses (personas, requests).

:func:`plan_assessments` turns the methods and inventories asked for into :class:`Planned` assessments,
each found done already (reused) or left to run; the reports (``big5.quickstart_report``) read the same
constants (:data:`DOSE_LEVELS`, :data:`MIXTURE_PAIRS`) to lay out their tables.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import typer

from big5core.generation import GREEDY, Decoding
from big5core.traits import TRAITS, Level, Trait

# FULL_TRAINING is what docs/RESULTS.md measured (bench/fidelity.py, 2026-12-01): one core per job,
# SFT ~6.5 s/step, DPO ~25 s/step at batch 4 x <= 160 tokens. QUICK_TRAINING halves the steps. The
# per-trait adapters are the persona and the parts every composed trait vector is built from; the
# unified adapter is the paper's main method; DPO starts from the SFT adapter of the same condition
# (`init_from`), the contrastive step that makes an adapter use its level. The unified adapters train
# on twin batches (a Speaker X turn at a level and at its opposite, `TrainSpec.mirror_batches`): with
# random batches even DPO left the unified adapter level-blind; with twins 30 DPO steps make it
# condition. SFT unified trains with the level-contrast term (`TrainSpec.level_contrast`): plain SFT
# stayed level-blind even after 300 steps (1.2 epochs); with the term it conditions (200 steps or
# weight 3 did no better, measured on a GPU). A step costs more than a plain one (each reply is
# scored under the opposite level too), hence 80 steps. DPO unified, started from the
# contrast-trained SFT, moves all five traits by +0.36..+0.65, so the default plan leaves per-trait
# DPO to `--full`. Timed on 2 idle cores (2026-12-04, docs/RESULTS.md): 33 min in all. DPO unified trains
# with an NLL term on the chosen reply (`sft_weight` 1, TRL's "sft" loss beside the sigmoid), beta 0.5 and
# lr 5e-4 (issue 25, 2026-12-07): plain DPO at lr 1e-3 (loss 0.002 at step 30) collapsed onto stock openings
# (half of a condition's replies opening alike) and ignored the user (relevance 0.27x the real replies'); with
# the NLL term its worst cell shares 8% and relevance is 0.85x, the judge gap >= +0.30 on every trait.
# The unified adapters train with the answer-format term (`answer_format` 1, trainer/answer_format.py):
# without it SFT unified answered half of BFI-44 (some conditions none) and DPO unified none; with it SFT
# unified answers every item (issue 25, 2026-12-07; DPO unified too). Its default target keeps the base
# model's whole answer distribution; the "options" target (keep only the probability of answering with a
# number) was measured too and did no better: judge gaps alike, and every BFI-44 item answered "1" at every
# level, so the questionnaire stays flat either way on this model (docs/RESULTS.md, 2026-12-07, night).
_E_A = ["extraversion:high", "extraversion:low", "agreeableness:high", "agreeableness:low"]
QUICK_TRAINING: dict[str, dict[str, Any]] = {
    "sft-per-trait": {"method": "sft", "layout": "per-trait", "max_steps": 20, "learning_rate": 1e-3},
    "sft-unified": {
        "method": "sft",
        "layout": "unified",
        "max_steps": 80,
        "learning_rate": 1e-3,
        "level_contrast": 1.0,
        "answer_format": 1.0,
    },
    "dpo-unified": {
        "method": "dpo",
        "layout": "unified",
        "init_from": "sft",
        "max_steps": 30,
        "learning_rate": 5e-4,
        "beta": 0.5,
        "sft_weight": 1.0,
        "answer_format": 1.0,
    },
}
FULL_TRAINING: dict[str, dict[str, Any]] = {
    "sft-per-trait": {"method": "sft", "layout": "per-trait", "max_steps": 40, "learning_rate": 1e-3},
    "sft-unified": {
        "method": "sft",
        "layout": "unified",
        "max_steps": 200,
        "learning_rate": 1e-3,
        "level_contrast": 1.0,
        "answer_format": 1.0,
    },
    "dpo-per-trait": {
        "method": "dpo",
        "layout": "per-trait",
        "init_from": "sft",
        "max_steps": 12,
        "learning_rate": 5e-4,
        "conditions": [*_E_A, "neuroticism:high", "neuroticism:low"],
    },
    "dpo-unified": {
        "method": "dpo",
        "layout": "unified",
        "init_from": "sft",
        "max_steps": 60,
        "learning_rate": 5e-4,
        "beta": 0.5,
        "sft_weight": 1.0,
        "answer_format": 1.0,
    },
}
COMMON_TRAINING: dict[str, Any] = {
    "per_device_train_batch_size": 4,
    "max_length": 160,
    "warmup_steps": 2,
    "save_steps": 50,
    "eval": False,
}
DOSE_LEVELS: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
MIXTURE_PAIRS: tuple[tuple[Trait, Trait], ...] = (
    (Trait.EXTRAVERSION, Trait.AGREEABLENESS),
    (Trait.EXTRAVERSION, Trait.CONSCIENTIOUSNESS),
    (Trait.OPENNESS, Trait.NEUROTICISM),
)
"""2x2 mixtures of the dialogue plan. The first two pairs are ones whose judges the real replies keep
apart (cross effect within 0.10 in the judge card); openness x neuroticism is one they do not (the
real O replies move the N judge by about -0.4), kept to show the reference at work."""


@dataclass
class Planned:
    """One assessment of the plan: what it measures (for the tables) and its request."""

    label: str
    kind: str  # questionnaire | dialogue
    request: Any
    assessment_id: str | None = None


def _adapter_exists(stack: Any, name: str) -> bool:
    """A ready adapter ``name`` on this base model is in the registry."""
    from big5core.errors import DomainError
    from big5personas import registry

    with stack.sessions() as session:
        try:
            return registry.get(session, name).base_model == stack.base_model_id
        except DomainError:
            return False


def method_personas(stack: Any, methods: list[str]) -> dict[str, dict[str, Any]]:
    """label -> persona: Direct, and each method x 10 conditions (SFT/DPO: every trained layout, by name)."""
    out: dict[str, dict[str, Any]] = {}
    if "direct" in methods:
        out["direct"] = {"method": "direct"}
    for trait in TRAITS:
        for level in Level:
            condition = {trait.value: level.value}
            if "prompt" in methods:
                out[f"prompt|{trait.value}|{level.value}"] = {"method": "prompt", "traits": condition}
            if "demo" in methods:
                out[f"demo|{trait.value}|{level.value}"] = {"method": "demo", "traits": condition}
            if "steer" in methods:
                out[f"steer|{trait.value}|{level.value}"] = {"method": "steer", "traits": condition}
            for method in ("sft", "dpo"):
                if method not in methods:
                    continue
                if _adapter_exists(stack, f"{method}-unified"):
                    out[f"{method}-unified|{trait.value}|{level.value}"] = {
                        "method": method,
                        "adapter": f"{method}-unified",
                        "traits": condition,
                    }
                name = f"{method}-{trait.value}-{level.value}"
                if _adapter_exists(stack, name):
                    out[f"{method}-per-trait|{trait.value}|{level.value}"] = {"method": method, "adapter": name}
    return out


def dialogue_personas(stack: Any, methods: list[str]) -> dict[str, dict[str, Any]]:
    """label -> persona of the dialogue plan: :func:`method_personas`, the dose-response, the mixtures."""
    out = method_personas(stack, methods)
    if "sft" in methods:
        for trait in TRAITS:
            if not all(_adapter_exists(stack, f"sft-{trait.value}-{lv.value}") for lv in Level):
                continue
            for value in DOSE_LEVELS:
                if value in (-1.0, 1.0):
                    level = "high" if value > 0 else "low"
                    persona: dict[str, Any] = {"method": "sft", "adapter": f"sft-{trait.value}-{level}"}
                elif value == 0.0:
                    persona = {"method": "direct"}
                else:
                    persona = {"method": "sft", "traits": {trait.value: value}}
                out[f"dose-sft|{trait.value}|{value:+.1f}"] = persona
        for a, b in MIXTURE_PAIRS:
            names = [f"sft-{t.value}-{lv.value}" for t in (a, b) for lv in Level]
            if not all(_adapter_exists(stack, n) for n in names):
                continue
            for sa in (1, -1):
                for sb in (1, -1):
                    out[f"mix-sft|{a.value}:{sa:+d}|{b.value}:{sb:+d}"] = {
                        "method": "sft",
                        "traits": {a.value: float(sa), b.value: float(sb)},
                    }
    for method in ("prompt", "steer"):  # the training-free methods: any value, any mixture
        if method not in methods:
            continue
        for trait in TRAITS:
            for value in DOSE_LEVELS:
                persona = {"method": "direct"} if value == 0.0 else {"method": method, "traits": {trait.value: value}}
                out[f"dose-{method}|{trait.value}|{value:+.1f}"] = persona
    if "steer" in methods:
        for a, b in MIXTURE_PAIRS:
            for sa in (1, -1):
                for sb in (1, -1):
                    out[f"mix-steer|{a.value}:{sa:+d}|{b.value}:{sb:+d}"] = {
                        "method": "steer",
                        "traits": {a.value: float(sa), b.value: float(sb)},
                    }
    return out


def plan_assessments(
    stack: Any, inventories: list[str], methods: list[str], *, runs: int, items: int | None, reply_tokens: int
) -> dict[str, Planned]:
    """Every assessment of the quickstart's tables, each found done already (reused) or to run."""
    from evaluator import store
    from evaluator.inventories import DIALOGUE_INVENTORY
    from evaluator.schemas import AssessRequest

    plan: dict[str, Planned] = {}
    for inventory in inventories:
        for label, persona in method_personas(stack, methods).items():
            request = AssessRequest.model_validate(
                {"persona": persona, "inventory": inventory, "scoring": "logprob", "runs": runs}
            )
            plan[f"{inventory}:{label}"] = Planned(label, "questionnaire", request)
    for label, persona in dialogue_personas(stack, methods).items():
        body: dict[str, Any] = {"persona": persona, "inventory": DIALOGUE_INVENTORY, "max_tokens": reply_tokens}
        if items is not None:
            body["max_items"] = items
        plan[f"dialogue:{label}"] = Planned(label, "dialogue", AssessRequest.model_validate(body))
    from big5core.errors import DomainError

    seen: dict[tuple[str, str], str] = {}
    pending: set[tuple[str, str]] = set()  # to run; a duplicate stays None too and run_assessments runs it once
    for key, planned in list(plan.items()):
        request = planned.request
        try:
            resolved = stack.resolver.resolve(request.persona)
        except DomainError as exc:  # e.g. a method whose adapters are not trained: left out, said so
            typer.echo(f"[assess] {key}: left out ({exc})")
            del plan[key]
            continue
        signature = (resolved.key, request_signature(request))
        if signature in seen:  # e.g. the dose-response's 0 is Direct
            planned.assessment_id = seen[signature]
            continue
        with stack.sessions() as session:
            for a in store.search(session, persona_key=resolved.key, inventory=request.inventory, state="done"):
                if (
                    a.runs == request.runs
                    and a.scoring_mode == request.scoring
                    and _same_options(a.options, request, a.summary)
                ):
                    planned.assessment_id = a.id
                    break
        if planned.assessment_id is not None:
            seen[signature] = planned.assessment_id
        else:
            pending.add(signature)
    todo = len(pending)
    typer.echo(f"[assess] {len(plan)} assessment(s) in the plan: {todo} to run, {len(plan) - todo} reused")
    return plan


DECODING_OPTIONS = tuple(f.name for f in fields(Decoding))
"""The decoding options a stored dialogue assessment must share with a planned one to be reused."""


def request_signature(request: Any) -> str:
    """What makes two planned requests of one persona the same assessment (run once, or reused)."""
    decoding = "|".join(str(getattr(request, k)) for k in DECODING_OPTIONS)
    return f"{request.inventory}|{request.scoring}|{request.runs}|{request.max_items}|{request.max_tokens}|{decoding}"


def _same_options(options: dict[str, Any], request: Any, summary: dict[str, Any] | None = None) -> bool:
    """A stored assessment answers the planned request: same turns, length and decoding, and (dialogue) its
    replies' quality measured (assessments stored before reply quality existed are run again)."""
    if request.scoring != "judge":
        return True
    same = options.get("max_items") == request.max_items and options.get("max_tokens") == request.max_tokens
    decoding = all(options.get(k, _OLD_DEFAULTS.get(k)) == getattr(request, k) for k in DECODING_OPTIONS)
    return same and decoding and bool((summary or {}).get("quality"))


_OLD_DEFAULTS = {k: v for k, v in asdict(GREEDY).items() if k != "temperature"}
"""The decoding of dialogue assessments stored before these options were recorded: greedy, vLLM's neutral
values. Temperature is left out, as it always was: a stored assessment that does not record it is not reused."""


def reference_path(reports: Path, items: int | None) -> Path:
    """Where the real replies' quality (the reference row) of the dialogue plan's turns is kept."""
    return reports / f"quality-reference-{items or 'all'}.json"
