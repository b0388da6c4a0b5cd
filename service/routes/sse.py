"""Server-sent events: encoding, the response headers every stream of this service uses, and their OpenAPI.

OpenAPI before 3.2 has no word for a stream's items; as 3.2's ``itemSchema`` does (and schemathesis
reads a ``text/event-stream`` schema), :func:`stream_content` documents ONE event: its ``event`` name
and its ``data`` line, JSON (``contentMediaType``) of a component schema, or a literal like [DONE].
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from service.context import current_request_id
from service.errors import problem_body

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: BaseModel | dict[str, Any] | str, event: str | None = None) -> bytes:
    """One event: ``event:`` line if named, one ``data:`` line of JSON (or a literal like [DONE])."""
    if isinstance(data, BaseModel):
        payload = data.model_dump_json()
    elif isinstance(data, dict):
        payload = json.dumps(data, separators=(",", ":"), default=str)
    else:
        payload = data
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def event_stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


def stream_problem(exc: BaseException, instance: str) -> dict[str, Any]:
    """The problem body for a failure after the status line went out (logged here, sent as an event)."""
    kind, body = problem_body(exc, instance, current_request_id())
    if kind.status >= 500:
        logger.error("Stream on %s failed", instance, exc_info=exc)
    return body


def event(names: list[str], data: dict[str, Any]) -> dict[str, Any]:
    """One kind of event: its ``event:`` name(s) ("message" when unnamed) and its ``data`` schema."""
    return {"type": "object", "required": ["event", "data"], "properties": {"event": {"enum": names}, "data": data}}


def json_data(schema: dict[str, Any]) -> dict[str, Any]:
    """A ``data`` line holding JSON that validates against ``schema``."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def component(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def stream_content(*events: dict[str, Any]) -> dict[str, Any]:
    """The ``content`` entry of a streamed 200: each event is one of ``events``."""
    return {"text/event-stream": {"schema": {"anyOf": list(events)}}}
