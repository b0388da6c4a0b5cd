"""API models of the evaluator (requests and responses of /v1/assess and friends)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from big5core.generation import DEFAULT_DECODING, Decoding, SamplingOptions
from big5personas.spec import PersonaSpec
from evaluator.inventories import DIALOGUE_INVENTORY, InventoryItem, LikertScale
from evaluator.scoring import DEFAULT_MIN_COVERAGE, DEFAULT_MIN_OPTION_MASS


class AssessRequest(BaseModel):
    """Administer an inventory to a persona, one item per fresh conversation."""

    model_config = ConfigDict(extra="forbid")

    persona: PersonaSpec = Field(description="The persona, resolved exactly as /v1/generate resolves it.")
    inventory: str = Field(
        "ipip_neo_120",
        description="bfi44, ipip_neo_120, ipip_neo_300, an uploaded name, or big5chat-dialogue (the persona "
        "answers held-out BIG5-CHAT Speaker X turns; each reply is scored by the trait judge).",
    )
    scoring: Literal["logprob", "label", "label-norm", "generate", "judge"] = Field(
        "logprob",
        description="logprob: next-token probability of each option digit (one forward pass, no sampling); "
        "label / label-norm: log-likelihood of each option's label text as the reply, as lm-evaluation-harness "
        "scores multiple choice (label-norm: per character, lm-eval's acc_norm; both are stored either way); "
        "generate: the paper's protocol (sample, parse strictly, record failures); "
        "judge: the dialogue assessment's only mode (implied by inventory big5chat-dialogue).",
    )
    min_option_mass: float = Field(
        DEFAULT_MIN_OPTION_MASS,
        ge=0,
        le=1,
        description="Option-mass floor (logprob, label, label-norm): an item whose options together get less "
        "probability than this is recorded as a failure ('no answer: option mass ... < floor'), keeps its "
        f"distribution and has no value. Default {DEFAULT_MIN_OPTION_MASS:g}.",
    )
    min_coverage: float = Field(
        DEFAULT_MIN_COVERAGE,
        ge=0,
        le=1,
        description="A trait answered in fewer than this share of its (item, run) pairs has no score "
        f"(tables show 'n/a (coverage 3%)'). Default {DEFAULT_MIN_COVERAGE:g}.",
    )
    runs: int = Field(5, ge=1, le=50, description="Administrations of the whole inventory.")
    shuffle: bool = Field(False, description="Shuffle the item order per run (recorded per response).")
    vary_instruction: bool = Field(
        True, description="Cycle through the inventory's instruction variants across runs (run r uses r mod n)."
    )
    vary_options: bool = Field(
        False,
        description="Also cycle through answer-format wordings across runs (run r uses (r div n_instructions) mod "
        "n_wordings; digit and generate modes), recorded per response; the summary reports each trait's SD "
        "across framings.",
    )
    seed: int = Field(0, description="Seed for shuffling and sampling.")
    temperature: float = Field(
        0.6,
        ge=0,
        le=2,
        description="generate mode (paper: 0.6); the dialogue assessment defaults to the service's default "
        "decoding (0 asks for greedy).",
    )
    max_tokens: int = Field(
        128, ge=1, le=1024, description="generate mode (paper: 128); the dialogue assessment's reply length (64)."
    )
    max_items: int | None = Field(
        None, ge=1, description="big5chat-dialogue only: ask the first N held-out turns (default all)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="generate mode and the dialogue assessment: nucleus sampling.")
    min_p: float = Field(
        DEFAULT_DECODING.min_p, ge=0, le=1, description="The dialogue assessment: vLLM's min-p (0 = off)."
    )
    repetition_penalty: float = Field(
        DEFAULT_DECODING.repetition_penalty,
        gt=0,
        le=2,
        description="The dialogue assessment: vLLM's repetition penalty (1 = off; > 1 discourages tokens already "
        "in the prompt or the reply).",
    )
    frequency_penalty: float = Field(
        DEFAULT_DECODING.frequency_penalty, ge=-2, le=2, description="The dialogue assessment (OpenAI semantics)."
    )
    presence_penalty: float = Field(
        DEFAULT_DECODING.presence_penalty, ge=-2, le=2, description="The dialogue assessment (OpenAI semantics)."
    )

    def dialogue_sampling(self) -> SamplingOptions:
        """The decoding of every dialogue reply (its seed is set per reply)."""
        decoding = Decoding(
            temperature=self.temperature,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
        )
        return decoding.sampling(self.max_tokens)

    @model_validator(mode="after")
    def _dialogue_defaults(self) -> AssessRequest:
        """The dialogue assessment is scored by the judge with the service's default decoding
        (``DEFAULT_DECODING``), 64 tokens, one run, unless asked otherwise."""
        given = self.model_fields_set
        if self.inventory == DIALOGUE_INVENTORY:
            if "scoring" in given and self.scoring != "judge":
                raise ValueError(
                    f"{DIALOGUE_INVENTORY} is scored by the trait judge (scoring 'judge'), not {self.scoring!r}"
                )
            self.scoring = "judge"
            if "temperature" not in given:
                self.temperature = DEFAULT_DECODING.temperature
            if "max_tokens" not in given:
                self.max_tokens = 64
            if "runs" not in given:
                self.runs = 1
        else:
            if self.scoring == "judge":
                raise ValueError(f"scoring 'judge' is for inventory {DIALOGUE_INVENTORY} only")
            if self.max_items is not None:
                raise ValueError(f"max_items is for inventory {DIALOGUE_INVENTORY} only")
        return self


class RunAccepted(BaseModel):
    """A background run (an assessment, a reasoning run) is queued: poll ``links["self"]``."""

    id: str
    state: str
    links: dict[str, str]

    @classmethod
    def queued(cls, collection: str, run_id: str) -> Self:
        """The 202 reply for run ``run_id`` of ``collection`` (``/v1/assessments``); set its self link as Location."""
        location = f"{collection}/{run_id}"
        return cls(id=run_id, state="queued", links={"self": location, "items": f"{location}/items"})


def public_progress(progress: Mapping[str, Any] | None) -> dict[str, Any]:
    """A run's progress as the API shows it: without the ``owner`` (host and process) its heartbeat names."""
    return {k: v for k, v in (progress or {}).items() if k != "owner"}


class AssessAccepted(RunAccepted):
    pass  # a name of its own in the OpenAPI document


class TraitScoreOut(BaseModel):
    mean: float | None = Field(description="None when not scored (coverage below the threshold, or no answers).")
    sd: float | None = Field(description="SD across runs.")
    n_runs: int
    coverage: float | None = Field(None, description="Answered (item, run) pairs / all of them.")
    n_answered: int | None = None
    n_asked: int | None = None
    z: float | None = None


class AssessmentOut(BaseModel):
    id: str
    state: str
    persona: dict[str, Any]
    resolved_persona: dict[str, Any]
    method: str
    inventory: str
    scoring: str
    runs: int
    options: dict[str, Any]
    progress: dict[str, Any]
    error: str | None
    traits: dict[str, TraitScoreOut] = Field(default_factory=dict)
    facets: dict[str, TraitScoreOut] = Field(default_factory=dict)
    summary: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    finished_at: datetime | None


class ItemResponseOut(BaseModel):
    run: int
    position: int
    item_id: str
    variant: int
    option_variant: int = 0
    raw_text: str | None
    option_probs: list[float] | None
    option_logprobs: list[float | None] | None = None
    option_probs_norm: list[float] | None = None
    option_mass: float | None
    expected: float | None
    argmax: int | None
    value: float | None
    parse_error: str | None
    judge_scores: dict[str, float] | None = None
    quality: dict[str, Any] | None = Field(
        None,
        description="The dialogue assessment: the reply's quality (repetition: share of repeated word 3-grams; "
        "opening: first three words; relevance: TF-IDF cosine with the turn; perplexity under the base model).",
    )


class InventoryUpload(BaseModel):
    """A custom inventory: items (id, text, trait, facet, keyed), a Likert scale, instruction, template."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{1,63}$")
    title: str = Field(min_length=1)
    citation: str = ""
    licence: str = ""
    instruction: str = Field(min_length=1, description="Shown before each statement; should name the scale.")
    statement_template: str = Field("Statement: {statement}", description="Must contain {statement}.")
    scale: LikertScale
    items: list[InventoryItem] | None = Field(None, description="Items as objects...")
    items_csv: str | None = Field(None, description="...or as CSV text with header id,text,trait,facet,keyed.")


class InventoryOut(BaseModel):
    name: str
    title: str
    citation: str
    licence: str
    builtin: bool
    n_items: int
    scale: dict[str, Any]


class CompareRequest(BaseModel):
    """The paper's table, one row per comparable group (method, adapter and version, layout, scoring mode,
    runs, base model), with n per cell."""

    model_config = ConfigDict(extra="forbid")

    inventory: str = "ipip_neo_120"
    methods: list[str] | None = Field(None, description="Restrict to these methods (default: all found).")
    scoring: str | None = Field(None, description="Restrict to one scoring mode (default: all, in separate rows).")
    base_model: str | None = Field(None, description="Restrict to one base model.")
    mix_base_models: bool = Field(
        False, description="Allow assessments of several base models in one table (otherwise 400)."
    )
    reliability: bool = Field(
        True, description="Add Cronbach's alpha and McDonald's omega per group and trait (personas x runs)."
    )
    format: Literal["json", "svg", "png"] = "json"
