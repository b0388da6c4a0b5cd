"""The request id of the request being served, as a context variable.

Set by :class:`service.middleware.RequestContextMiddleware`; read by the problem responses
(:mod:`service.errors`), the log records and the streams, none of which need the middleware itself.
"""

from __future__ import annotations

from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("big5_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being served in this context (None outside a request)."""
    return request_id_var.get()
