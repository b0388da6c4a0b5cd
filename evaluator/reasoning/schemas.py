"""API models of /v1/reasoning."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from big5personas.spec import PersonaSpec
from evaluator.schemas import RunAccepted

if TYPE_CHECKING:
    from big5core.models import ReasoningItem, ReasoningResult

PersonaIn = str | PersonaSpec


class ReasoningRequest(BaseModel):
    """Evaluate personas on reasoning tasks (lm-evaluation-harness), every item stored."""

    model_config = ConfigDict(extra="forbid")

    personas: list[PersonaIn] = Field(
        min_length=1,
        max_length=64,
        description="Persona model names as in /v1/chat/completions (big5/sft?conscientiousness=1, big5/direct, "
        "big5/prompt?neuroticism=-1) or persona objects as in /v1/assess.",
    )
    tasks: list[str] = Field(
        min_length=1,
        max_length=16,
        description="lm-eval task names: social_iqa, commonsense_qa, piqa, truthfulqa_mc1, truthfulqa_mc2, "
        "arc_easy, arc_challenge, mmlu (a stratified slice under a limit), gsm8k.",
    )
    limit: int | None = Field(
        None, ge=1, le=100_000, description="Items per task (the first N; MMLU stratified). None: the whole split."
    )
    apply_chat_template: bool = Field(
        False,
        description="Render each prompt with the model's chat template, the persona prefix in the user turn "
        "(lm-eval's apply_chat_template). Off: the raw lm-eval prompt with the prefix in front.",
    )
    max_gen_toks: int | None = Field(None, ge=1, le=4096, description="Generation limit for GSM8K (default 256).")

    def specs(self) -> list[PersonaSpec]:
        from evaluator.reasoning.lm import persona_spec

        return [persona_spec(p) for p in self.personas]


class ReasoningAccepted(RunAccepted):
    pass  # a name of its own in the OpenAPI document


class UnitOut(BaseModel):
    task: str
    lm_task: str
    persona_key: str
    method: str
    resolved_persona: dict[str, Any]
    lm_eval_version: str
    task_config_hash: str
    metrics: dict[str, Any]
    n_items: int
    seconds: float


class ReasoningRunOut(BaseModel):
    id: str
    state: str
    personas: list[str]
    tasks: list[str]
    limit: int | None
    options: dict[str, Any]
    lm_eval_version: str
    progress: dict[str, Any]
    error: str | None
    results: list[UnitOut]
    created_at: datetime
    finished_at: datetime | None


class ReasoningItemOut(BaseModel):
    """One stored item with its unit's task and persona."""

    task: str
    persona_key: str
    doc_index: int
    item_id: str
    target: str
    loglikelihoods: list[float] | None
    greedy: list[bool] | None
    generated: str | None
    score: float
    correct: bool
    metrics: dict[str, Any]

    @classmethod
    def of(cls, result: ReasoningResult, item: ReasoningItem) -> ReasoningItemOut:
        """Every field but ``task`` and ``persona_key`` (the unit's) is the item's column of that name."""
        columns = {name: getattr(item, name) for name in cls.model_fields if name not in ("task", "persona_key")}
        return cls(task=result.task, persona_key=result.persona_key, **columns)


class ReasoningCompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runs: list[str] | None = Field(None, description="Runs to read (default: every done run).")
    tasks: list[str] | None = Field(None, description="Restrict to these tasks.")
    methods: list[str] | None = Field(None, description="Restrict to these persona methods (Direct is always kept).")
    format: Literal["json", "svg", "png"] = "json"
