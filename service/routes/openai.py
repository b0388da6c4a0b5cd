"""OpenAI-compatible routes: POST /v1/chat/completions (``model`` is a persona) and GET /v1/models."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC

from fastapi import APIRouter, Depends, Request, Response

from big5core.models import Adapter, AdapterState
from big5core.training import UNIFIED
from big5core.traits import TRAITS, Method, Trait, TraitVector
from big5personas import registry
from big5personas.spec import persona_key
from service.deps import ServingDep, SessionDep, StateDep, require_client
from service.routes.sse import component, event, event_stream, json_data, sse, stream_content, stream_problem
from service.schemas import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ModelCard,
    ModelList,
    PersonaReport,
    Usage,
    problems,
)
from service.serving import CompletionStream

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_client)])

STREAM_ERROR = {"type": "object", "required": ["error"], "properties": {"error": component("Problem")}}


def _finish(reason: str | None) -> str | None:
    return reason if reason in (None, "stop", "length") else "stop"


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={
        200: {
            "description": "With stream=true: chat.completion.chunk events (an error object if generation fails "
            "after the status line), then [DONE].",
            "content": stream_content(
                event(["message"], json_data(component("ChatCompletionChunk"))),
                event(["message"], json_data(STREAM_ERROR)),
                event(["message"], {"const": "[DONE]"}),
            ),
        },
        **problems(400, 401, 404, 409, 413, 422, 503, 504),
    },
)
async def chat_completions(
    body: ChatCompletionRequest, serving: ServingDep, state: StateDep, request: Request
) -> Response | ChatCompletionResponse:
    """Chat completion in the persona named by ``model`` (``big5/sft?openness=1``, ``big5/direct``...)."""
    spec = body.to_persona_spec(state.stack.base_model_id)
    messages, sampling = body.to_messages(), body.to_sampling()
    if body.stream:
        stream = await serving.open_stream(spec, messages, sampling, prefix="chatcmpl")
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return event_stream(_chunks(stream, body.model, include_usage, request.url.path))
    done = await serving.complete(spec, messages, sampling, prefix="chatcmpl")
    result = done.result
    return ChatCompletionResponse(
        id=done.id,
        model=body.model,
        choices=[Choice(message=AssistantMessage(content=result.text), finish_reason=_finish(result.finish_reason))],
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
        persona=PersonaReport.model_validate(done.persona.report()),
    )


async def _chunks(stream: CompletionStream, model: str, include_usage: bool, instance: str) -> AsyncIterator[bytes]:
    created = int(time.time())

    def chunk(delta: DeltaMessage, finish_reason: str | None = None) -> bytes:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason)
        return sse(ChatCompletionChunk(id=stream.id, created=created, model=model, choices=[choice]))

    try:
        yield chunk(DeltaMessage(role="assistant", content=""))
        async for piece in stream:
            if piece.delta_text:
                yield chunk(DeltaMessage(content=piece.delta_text))
        yield chunk(DeltaMessage(), _finish(stream.finish_reason))
        if include_usage:
            usage = Usage(
                prompt_tokens=stream.prompt_tokens,
                completion_tokens=stream.completion_tokens,
                total_tokens=stream.prompt_tokens + stream.completion_tokens,
            )
            yield sse(ChatCompletionChunk(id=stream.id, created=created, model=model, choices=[], usage=usage))
    except Exception as exc:  # the status line is sent: an error object, as OpenAI-style servers do
        yield sse({"error": stream_problem(exc, instance)})
    yield sse("[DONE]")


@router.get("/models", response_model=ModelList)
def list_models(state: StateDep, session: SessionDep) -> ModelList:
    """Persona ids usable as ``model``: the baselines and one or more per registered ready adapter."""
    base = state.stack.base_model_id
    step = state.settings.service.composition_step
    started = int(time.time())
    cards: dict[str, ModelCard] = {}

    def add(model_id: str, created: int, adapter: str | None = None) -> None:
        cards.setdefault(model_id, ModelCard(id=model_id, created=created, root=base, adapter=adapter))

    add(persona_key(Method.DIRECT, {}), started)
    for trait in TRAITS:
        for sign in (1.0, -1.0):
            add(persona_key(Method.PROMPT, {trait: sign}), started)
    for row in registry.list_adapters(session, state=AdapterState.READY, base_model=base):
        created = int(row.created_at.astimezone(UTC).timestamp()) if row.created_at else started
        method = Method(row.method) if row.method in (Method.SFT, Method.DPO) else None
        if method is None:
            continue
        for traits in _conditions(row, step):
            add(persona_key(method, traits), created)  # resolved by traits: the newest matching adapter
            add(persona_key(method, traits, row.ref), created, row.ref)
    return ModelList(data=list(cards.values()))


def _conditions(row: Adapter, step: float) -> list[dict[Trait, float]]:
    """The trait vectors an adapter serves: every pole for a unified one, its own traits otherwise."""
    if row.layout == UNIFIED:
        return [{trait: sign} for trait in TRAITS for sign in (1.0, -1.0)]
    try:
        carried = TraitVector.model_validate(row.traits or {}).quantised(step)
    except ValueError:
        return []
    return [carried] if carried else []
