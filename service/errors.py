"""RFC 9457 problem responses: ONE table from error categories to HTTP.

Domain code raises its own exceptions without any HTTP knowledge; each derives from a category of
:mod:`big5core.errors` (not found, invalid, conflict, not ready, unavailable) and names itself with a
``code`` and a ``title``. :data:`PROBLEMS` says what each category means on the wire; the problem's
type and title are the exception's own. So the service imports no edge's exception classes, and a
new domain error is mapped by the category it derives from. A lookup walks the exception's MRO, so
the most specific listed class wins (``AdapterNotFound`` is a 404 although it is a registry error).
Anything not in the table is a 500 whose body carries no internals (the traceback goes to the log).
No detail names a filesystem path: each is passed through :func:`big5core.errors.redact_paths`
(messages keep their folders for the log, where the handler writes them whole).

The few exceptions defined here are the service's own conditions (queue full, body too large,
authentication); they are raised by the middleware, the dependencies and the serving layer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DataError, OperationalError, StatementError
from starlette.exceptions import HTTPException as StarletteHTTPException

from big5core.errors import Conflict, DomainError, Invalid, NotFound, NotReady, Unavailable, redact_paths
from service.context import current_request_id

logger = logging.getLogger(__name__)

PROBLEM_BASE = "https://big5chat.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


# ---------------------------------------------------------------- the service's own conditions


class QueueFull(Unavailable):
    """Admission control: ``max_queue`` generation/assessment requests are already in flight."""

    code, title, retry_after = "server-busy", "Too many requests in flight", 1


class GenerationTimeout(TimeoutError):
    """An engine call ran past ``request_timeout_s``."""


class AdapterLoadFailed(Conflict):
    """The engine refused an adapter the registry accepted (e.g. rank above ``max_lora_rank``)."""

    code, title = "adapter-load-failed", "The engine cannot load this adapter"


class BodyTooLarge(ValueError):
    """The request body exceeds ``max_body_bytes``."""


class Unauthorized(PermissionError):
    """No API key, or one that is not configured."""


class Forbidden(PermissionError):
    """A valid key without the rights the route needs (an admin route with a client key)."""


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class ProblemKind:
    status: int
    slug: str
    title: str
    retry_after: int | None = None  # seconds, sent as Retry-After
    expose_detail: bool = True  # False: the exception's text stays in the log


PROBLEMS: Mapping[type[BaseException], ProblemKind] = {
    # 422: the request does not match the schema
    RequestValidationError: ProblemKind(422, "validation-error", "Request validation failed"),
    ValidationError: ProblemKind(422, "validation-error", "Request validation failed"),
    # The domain's categories (type and title from the exception itself)
    Invalid: ProblemKind(400, Invalid.code, Invalid.title),  # well-formed but semantically invalid
    NotFound: ProblemKind(404, NotFound.code, NotFound.title),
    Conflict: ProblemKind(409, Conflict.code, Conflict.title),  # exists, but not usable as it is
    NotReady: ProblemKind(409, NotReady.code, NotReady.title),
    Unavailable: ProblemKind(503, Unavailable.code, Unavailable.title, retry_after=Unavailable.retry_after),
    # A request value the database cannot take as a query parameter: a NUL character in a string, a
    # number beyond its column's range. The detail is the driver's one-line reason, never the SQL.
    DataError: ProblemKind(400, "invalid-value", "A value of the request cannot be used"),
    # 401/403/413
    Unauthorized: ProblemKind(401, "unauthorized", "Missing or invalid API key"),
    Forbidden: ProblemKind(403, "forbidden", "This key may not use this route"),
    BodyTooLarge: ProblemKind(413, "body-too-large", "Request body too large"),
    # 504: try again later
    GenerationTimeout: ProblemKind(504, "generation-timeout", "The engine did not answer in time"),
    # The database refused or lost the connection (or asked for a retry): routes that need it wait
    # for it, routes that do not (direct and prompt generation) keep answering. Its text names hosts.
    OperationalError: ProblemKind(
        503, "database-unavailable", "The database is unavailable", retry_after=5, expose_detail=False
    ),
}

INTERNAL = ProblemKind(500, "internal-error", "Internal server error", expose_detail=False)


def kind_of(exc: BaseException) -> ProblemKind:
    """The table entry for ``exc`` (its most specific listed class), else the 500 entry."""
    if isinstance(exc, StarletteHTTPException):
        return _http_kind(exc.status_code)
    for cls in type(exc).__mro__:
        found = PROBLEMS.get(cls)
        if found is not None:
            if isinstance(exc, DomainError):  # the category's status, the exception's own type and title
                retry = getattr(exc, "retry_after", None) if found.retry_after is not None else None
                return replace(found, slug=exc.code, title=exc.title, retry_after=retry)
            return found
    return INTERNAL


def _http_kind(status: int) -> ProblemKind:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "HTTP error"
    return ProblemKind(status, phrase.lower().replace(" ", "-").replace("'", ""), phrase)


def type_uri(slug: str) -> str:
    return PROBLEM_BASE + slug


# ---------------------------------------------------------------- bodies and responses


_SCHEMA_LOC_PARTS = ("[key]", "constrained-", "literal[", "function-")  # pydantic's, not the client's


def validation_errors(errors: Sequence[Any], private_paths: Iterable[str | Path] = ()) -> list[dict[str, Any]]:
    """Pydantic errors without their inputs (which may be large or private), each naming its field."""
    out = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        out.append(
            {
                "field": ".".join(part for part in loc if not part.startswith(_SCHEMA_LOC_PARTS)),
                "loc": loc,
                "msg": redact_paths(str(error.get("msg", "")), private_paths),
                "type": str(error.get("type", "")),
            }
        )
    return out


def problem_body(
    exc: BaseException, instance: str, request_id: str | None = None, private_paths: Iterable[str | Path] = ()
) -> tuple[ProblemKind, dict[str, Any]]:
    """The problem of ``exc``. ``private_paths``: the server's relative folders (absolute paths are always
    redacted) that must not appear in the detail."""
    kind = kind_of(exc)
    private_paths = tuple(private_paths)
    body: dict[str, Any] = {"type": type_uri(kind.slug), "title": kind.title, "status": kind.status}
    if isinstance(exc, RequestValidationError | ValidationError):
        errors = validation_errors(exc.errors(), private_paths)
        body["detail"] = "; ".join(f"{e['field'] or 'body'}: {e['msg']}" for e in errors[:5])
        body["errors"] = errors
    elif isinstance(exc, StarletteHTTPException):
        body["detail"] = redact_paths(str(exc.detail), private_paths)
    elif isinstance(exc, StatementError) and kind.expose_detail:  # str(exc) carries the SQL and its parameters
        body["detail"] = redact_paths((str(exc.orig).strip().splitlines() or [kind.title])[0], private_paths)
    elif kind.expose_detail:
        body["detail"] = redact_paths(str(exc) or kind.title, private_paths)
    else:
        what = "An unexpected error occurred" if kind is INTERNAL else kind.title
        body["detail"] = f"{what}; the server log has the details" + (
            f" (request {request_id})." if request_id else "."
        )
    body["instance"] = instance
    if request_id:
        body["request_id"] = request_id
    return kind, body


def problem_response(
    exc: BaseException, instance: str, request_id: str | None = None, private_paths: Iterable[str | Path] = ()
) -> JSONResponse:
    """The problem+json response for ``exc`` (status, headers and body from the table)."""
    kind, body = problem_body(exc, instance, request_id, private_paths)
    headers: dict[str, str] = {}
    if isinstance(exc, StarletteHTTPException) and exc.headers:
        headers.update(exc.headers)
    if kind.retry_after is not None:
        headers["Retry-After"] = str(kind.retry_after)
    if kind.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="big5chat"'
    return JSONResponse(jsonable_encoder(body), status_code=kind.status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _request_id(request: Request) -> str | None:
    return current_request_id()


def install(app: FastAPI, private_paths: Iterable[str | Path] = ()) -> None:
    """Register one handler for every class in the table (and HTTP errors raised by routing).

    ``private_paths``: the server's folders as configured (a relative data dir), kept out of details.
    """
    hidden = tuple(private_paths)

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        kind = kind_of(exc)
        if kind.status >= 500 and kind is INTERNAL:
            logger.error("Unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        elif kind.status >= 500:
            logger.warning("%s on %s: %s", kind.slug, request.url.path, exc)
        elif redact_paths(str(exc), hidden) != str(exc):  # the client's copy lost a path: the log keeps it
            logger.info("%s on %s: %s", kind.slug, request.url.path, exc)
        return problem_response(exc, request.url.path, _request_id(request), hidden)

    for cls in (*PROBLEMS, StarletteHTTPException):
        app.add_exception_handler(cls, handle)  # type: ignore[arg-type]
