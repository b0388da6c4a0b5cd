"""API models of the service (protocol-style, after vLLM's ``entrypoints/openai/protocol.py``).

Requests are strict (``extra="forbid"``: a misspelt trait or option is a 422 naming the field) and
convert themselves: ``to_persona_spec()``, ``to_messages()``, ``to_sampling()``. Responses never
carry file paths: a client names adapters and trait vectors only.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from big5core.generation import DEFAULT_DECODING, SamplingOptions
from big5core.prompts import ChatMessage
from big5core.traits import Method, TraitVector
from big5personas.spec import PersonaSpec

REST_OF_CONTEXT = 0
"""``SamplingOptions.max_tokens`` meaning "as many as the context leaves" (OpenAI's default)."""

AdapterName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*(@[0-9]+)?$",
        max_length=160,
        description="A registry adapter: name (newest ready version) or name@version.",
        examples=["sft-openness-high@1"],
    ),
]
Stop = Annotated[
    str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None,
    Field(description="Stop string(s); the text ends before the first one generated (up to 4)."),
]


def _stop_list(stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    return [stop] if isinstance(stop, str) else list(stop) or None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- shared pieces


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``), the body of every error response."""

    type: str = Field(
        description="https://big5chat.dev/problems/<slug>", examples=["https://big5chat.dev/problems/persona-not-found"]
    )
    title: str
    status: int
    detail: str
    instance: str = Field(description="The request path.")
    request_id: str | None = Field(None, description="Also in the X-Request-ID response header.")
    errors: list[dict[str, Any]] | None = Field(None, description="422 only: one entry per invalid field.")


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting the problem statuses a route can answer."""
    return {
        status: {"model": Problem, "content": {"application/problem+json": {}}, "description": "Problem details"}
        for status in statuses
    }


class Message(_Strict):
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks this turn.")
    content: str = Field(max_length=200_000, description="The turn's text.")

    def to_chat(self) -> ChatMessage:
        return ChatMessage(role=self.role, content=self.content)


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of the rendered prompt, persona included.")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int


class PersonaReport(BaseModel):
    """How the persona was realised (``ResolvedPersona.report()``): enough to reproduce it."""

    key: str = Field(description="Canonical persona string, e.g. big5/sft?openness=0.5&extraversion=-1.")
    method: Method
    traits: dict[str, float] = Field(description="Quantised trait intensities that were applied.")
    template_id: str = Field(description="Prompt template id (training and serving share it).")
    prefix: str | None = Field(description="Text put in front of the last user turn, if any.")
    adapter: str | None = Field(description="Adapter served: a registry ref or a composed-<hash> name.")
    composed: bool = Field(description="True when several per-trait adapters were composed exactly.")
    parts: list[dict[str, Any]] = Field(description="Registry adapters and their weights.")
    steering: dict[str, Any] | None = Field(
        None, description="Activation steering applied: vector set, layers, scale per trait, intensities."
    )


# ---------------------------------------------------------------- /v1/generate


class GenerateRequest(_Strict):
    """Generate one reply in a persona. Give ``messages`` or ``prompt`` (exactly one)."""

    messages: list[Message] | None = Field(
        None, min_length=1, max_length=256, description="The conversation so far (OpenAI chat format)."
    )
    prompt: str | None = Field(None, max_length=200_000, description="A single user turn (instead of messages).")
    traits: TraitVector | None = Field(
        None, description="Trait intensities in [-1, 1] (or high/low); unknown traits are refused."
    )
    method: Method = Field(
        Method.SFT,
        description="sft/dpo: trained adapters; prompt: Prompt-Inst; demo: Prompt-Demo; direct: no persona.",
    )
    adapter: AdapterName | None = Field(None, description="Explicit registry adapter (sft/dpo only).")
    steer: TraitVector | None = Field(
        None, description="Activation steering added to the persona (trait intensities in [-1, 1], step 0.05)."
    )
    max_tokens: int = Field(128, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(DEFAULT_DECODING.temperature, ge=0.0, le=2.0, description="0 is greedy (deterministic).")
    top_p: float = Field(DEFAULT_DECODING.top_p, gt=0.0, le=1.0)
    min_p: float = Field(DEFAULT_DECODING.min_p, ge=0.0, le=1.0, description="vLLM's min-p (0 = off).")
    repetition_penalty: float = Field(
        DEFAULT_DECODING.repetition_penalty,
        gt=0.0,
        le=2.0,
        description="vLLM's repetition penalty (1 = off; > 1 discourages tokens already in the prompt or reply). "
        "The defaults of these fields are the measured choice of docs/RESULTS.md (personas loop without one).",
    )
    frequency_penalty: float = Field(DEFAULT_DECODING.frequency_penalty, ge=-2.0, le=2.0)
    presence_penalty: float = Field(DEFAULT_DECODING.presence_penalty, ge=-2.0, le=2.0)
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Sampling seed (reproducible sampling at temperature > 0)."
    )
    stop: Stop = None
    stream: bool = Field(False, description="Server-sent events: deltas, then a final event with usage.")

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        return self

    def to_persona_spec(self) -> PersonaSpec:
        """The persona asked for; only fields the client set are passed (the resolver cares)."""
        given = {
            name: getattr(self, name)
            for name in ("method", "traits", "adapter", "steer")
            if name in self.model_fields_set
        }
        return PersonaSpec(**given)

    def to_messages(self) -> list[ChatMessage]:
        if self.messages is not None:
            return [m.to_chat() for m in self.messages]
        return [ChatMessage(role="user", content=self.prompt or "")]

    def to_sampling(self) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.seed,
            stop=_stop_list(self.stop),
        )


class GenerateResponse(BaseModel):
    id: str
    text: str
    finish_reason: str | None = Field(description="stop (end of reply or a stop string) or length.")
    usage: Usage
    persona: PersonaReport


class GenerateStreamEvent(BaseModel):
    """One SSE ``data:`` payload of a streamed /v1/generate; the last one has the finish fields."""

    id: str
    delta: str = Field(description="Text generated since the previous event.")
    finish_reason: str | None = None
    usage: Usage | None = None
    persona: PersonaReport | None = None


# ---------------------------------------------------------------- OpenAI chat completions (subset)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = Field(None, description="Accepted and ignored.")

    def to_chat(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=text)


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a last chunk with usage (and no choices).")


class ChatCompletionRequest(_Strict):
    """OpenAI ``/v1/chat/completions``; ``model`` is a persona: ``big5/sft?openness=0.8&neuroticism=-1``."""

    model: str = Field(
        max_length=512,
        description="big5/<method>[?trait=value&...][&adapter=name@version]; see GET /v1/models.",
        examples=["big5/sft?openness=1", "big5/direct"],
    )
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Default: what the context leaves.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Default: the service's decoding.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Default: the service's decoding.")
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=2.0, description="vLLM extension. Default: the service's decoding (docs/RESULTS.md)."
    )
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM extension. Default: the service's decoding.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice is supported.")
    user: str | None = Field(None, description="Accepted and ignored.")

    def to_persona_spec(self, base_model_id: str | None = None) -> PersonaSpec:
        """Parse ``model`` (PersonaError when it is not a persona); the base model's id means direct."""
        if base_model_id is not None and self.model == base_model_id:
            return PersonaSpec(method=Method.DIRECT)
        return PersonaSpec.from_model_name(self.model)

    def to_messages(self) -> list[ChatMessage]:
        return [m.to_chat() for m in self.messages]

    def to_sampling(self) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=self.max_completion_tokens or self.max_tokens or REST_OF_CONTEXT,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=DEFAULT_DECODING.min_p if self.min_p is None else self.min_p,
            repetition_penalty=(
                DEFAULT_DECODING.repetition_penalty if self.repetition_penalty is None else self.repetition_penalty
            ),
            frequency_penalty=DEFAULT_DECODING.frequency_penalty
            if self.frequency_penalty is None
            else self.frequency_penalty,
            presence_penalty=DEFAULT_DECODING.presence_penalty
            if self.presence_penalty is None
            else self.presence_penalty,
            seed=self.seed,
            stop=_stop_list(self.stop),
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    persona: PersonaReport = Field(description="Extension: how the persona was realised.")


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str = Field(description="Persona string usable as the chat completions `model`.")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "big5chat"
    root: str = Field(description="The base model.")
    parent: str | None = None
    adapter: str | None = Field(None, description="Extension: the registry adapter this id names, if any.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- adapters


class AdapterOut(BaseModel):
    """A registry row as clients see it: everything except where its files live."""

    name: str
    version: int
    ref: str = Field(description="name@version")
    method: str
    layout: str
    traits: dict[str, Any]
    rank: int
    base_model: str
    state: str
    sha256: str | None
    train_loss: float | None
    eval_loss: float | None
    error: str | None = None
    created_at: datetime


class ReloadFailure(BaseModel):
    ref: str
    detail: str


class ReloadReport(BaseModel):
    adapters: int = Field(description="Registry rows for this base model (any state).")
    ready: int = Field(description="Ready adapters now servable.")
    new: list[str] = Field(description="Ready adapters seen for the first time, verified.")
    verified: int = Field(description="sha256 checks performed by this reload.")
    failed: list[ReloadFailure] = Field(description="New adapters whose files do not match the registry.")
    unloaded: list[str] = Field(description="Engine adapters dropped because they are no longer ready.")


# ---------------------------------------------------------------- training jobs


class JobAccepted(BaseModel):
    id: str
    state: str


class JobOut(BaseModel):
    id: str
    state: str
    attempts: int
    max_attempts: int
    progress: dict[str, Any]
    error: str | None
    result: dict[str, Any]
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


# ---------------------------------------------------------------- health


class HealthOut(BaseModel):
    status: Literal["loading", "ready", "restarting", "error"] = Field(
        description="loading: the engine starts; restarting: its core died and it is being restarted; "
        "error: it failed and will not come back (the process is about to exit)."
    )
    error: str | None = Field(None, description="Why the engine is not available, when it failed.")
    base_model: str | None = None
    engine_start_seconds: float | None = None
    engine_restarts: int = Field(0, description="Times the engine was restarted after its core died.")
