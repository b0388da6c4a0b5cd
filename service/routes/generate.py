"""POST /v1/generate: one reply in a persona, whole or as server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response

from service.deps import ServingDep, require_client
from service.routes.sse import component, event, event_stream, json_data, sse, stream_content, stream_problem
from service.schemas import GenerateRequest, GenerateResponse, GenerateStreamEvent, PersonaReport, Usage, problems
from service.serving import CompletionStream

router = APIRouter(prefix="/v1", tags=["generation"], dependencies=[Depends(require_client)])


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        200: {
            "description": "The reply; with stream=true, text/event-stream of GenerateStreamEvent "
            "(deltas, then `event: done` with finish_reason, usage and persona; `event: error` on failure).",
            "content": stream_content(
                event(["message", "done"], json_data(component("GenerateStreamEvent"))),
                event(["error"], json_data(component("Problem"))),
            ),
        },
        **problems(400, 401, 404, 409, 413, 422, 503, 504),
    },
)
async def generate(body: GenerateRequest, serving: ServingDep, request: Request) -> Response | GenerateResponse:
    """Resolve the persona (adapter, composed adapter or prompt) and generate."""
    spec, messages, sampling = body.to_persona_spec(), body.to_messages(), body.to_sampling()
    if body.stream:
        stream = await serving.open_stream(spec, messages, sampling)
        return event_stream(_events(stream, request.url.path))
    done = await serving.complete(spec, messages, sampling)
    result = done.result
    return GenerateResponse(
        id=done.id,
        text=result.text,
        finish_reason=result.finish_reason,
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
        persona=PersonaReport.model_validate(done.persona.report()),
    )


async def _events(stream: CompletionStream, instance: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            if chunk.delta_text:
                yield sse(GenerateStreamEvent(id=stream.id, delta=chunk.delta_text))
        usage = Usage(
            prompt_tokens=stream.prompt_tokens,
            completion_tokens=stream.completion_tokens,
            total_tokens=stream.prompt_tokens + stream.completion_tokens,
        )
        final = GenerateStreamEvent(
            id=stream.id,
            delta="",
            finish_reason=stream.finish_reason,
            usage=usage,
            persona=PersonaReport.model_validate(stream.persona.report()),
        )
        yield sse(final, event="done")
    except Exception as exc:  # the status line is sent: report the problem as the last event
        yield sse(stream_problem(exc, instance), event="error")
