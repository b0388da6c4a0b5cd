"""Pure ASGI middleware: request ids (and the last-resort 500), request metrics, the body size limit.

Pure ASGI rather than ``BaseHTTPMiddleware`` so streaming responses pass through untouched and the
request id's context variable is visible in the route, its background work and every log record.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.context import current_request_id, request_id_var
from service.errors import BodyTooLarge, problem_response
from service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def install_request_id_logging() -> None:
    """Give every log record a ``request_id`` attribute ("-" outside a request). Idempotent.

    A record factory rather than a handler filter, so records reach any handler (pytest's caplog,
    uvicorn's, a JSON formatter) with the attribute already set.
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "big5_request_id", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = request_id_var.get() or "-"
        return record

    factory.big5_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class RequestContextMiddleware:
    """X-Request-ID in and out (a fresh id when missing or malformed), and the 500 of last resort.

    An exception no handler knows reaches this layer: it is logged with its traceback and answered
    with a problem body that names the request id but nothing of the internals.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, REQUEST_ID_HEADER.encode())
        request_id = given if given and _VALID_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            logger.error("Unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            if started:
                raise
            response = problem_response(exc, scope.get("path", ""), request_id)
            await response(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class MetricsMiddleware:
    """Requests by route template and status, and their latency (streams: until the last byte)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(scope.get("method", ""), template, status, time.perf_counter() - began)


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: at once from Content-Length, else while reading (chunked).

    A body without Content-Length is read here, up to the limit, and replayed to the app; every route
    of this service takes a small JSON body, so buffering it costs nothing.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send, f"{declared} bytes declared")
                return
            await self.app(scope, receive, send)  # the server enforces Content-Length itself
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, f"more than {self.max_bytes} bytes sent")
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        exc = BodyTooLarge(f"request body too large: {what}; the limit is {self.max_bytes} bytes")
        response = problem_response(exc, scope.get("path", ""), current_request_id())
        response.headers["Connection"] = "close"
        await response(scope, receive, send)
