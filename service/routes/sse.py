"""Server-sent events: encoding and the response headers every stream of this service uses."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from service.errors import problem_body
from service.middleware import current_request_id

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
