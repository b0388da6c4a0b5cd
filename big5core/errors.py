"""Categories of domain errors: what kind of failure, never how a transport reports it.

Every domain exception of big5core, the trainer and the evaluator derives from one of these, and
names itself with a stable ``code`` (``"assessment-not-found"``) and a short ``title``. The service
maps the categories to HTTP in one table (``service/errors.py``), so it needs no edge's exception
classes; a CLI can map them to exit codes the same way.

- :class:`NotFound`: the thing asked for does not exist.
- :class:`Invalid`: well-formed, but it makes no sense or cannot be done as asked.
- :class:`Conflict`: it exists, but its state refuses the operation (already there, files corrupted).
- :class:`NotReady`: it exists, but is not usable yet (an adapter still pending).
- :class:`Unavailable`: a component it needs is down or busy; the same request may succeed later.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar


class DomainError(Exception):
    """Base of the domain's errors. Subclass a category, not this."""

    code: ClassVar[str] = "domain-error"
    title: ClassVar[str] = "Domain error"


class NotFound(DomainError, LookupError):
    code = "not-found"
    title = "Not found"


class Invalid(DomainError, ValueError):
    code = "invalid"
    title = "Invalid request"


class Conflict(DomainError):
    code = "conflict"
    title = "Conflict"


class NotReady(DomainError):
    code = "not-ready"
    title = "Not ready"


class Unavailable(DomainError):
    """A component is down or busy. ``retry_after``: a hint in seconds for when to try again."""

    code = "unavailable"
    title = "Temporarily unavailable"
    retry_after: ClassVar[int] = 10


# ---------------------------------------------------------------- what a client may read of an error

PATH_PLACEHOLDER = "<path>"
_PATH_CHARS = r"[^\s'\"`()<>\[\]{},;]"
# An absolute (or ./, ../, ~/) path that starts a word: "/data/adapters/x", "'/tmp/a'"; not "big5/sft",
# "https://host/x", "rows/s", "1/2", a lone " / " or a route of this API ("/v1/assessments/{id}").
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.~:/-])(?:~|\.{{1,2}})?/(?!v\d+/){_PATH_CHARS}+")


def redact_paths(text: str, roots: Iterable[str | Path] = ()) -> str:
    """``text`` with every filesystem path replaced by ``<path>``: absolute ones, and those under ``roots``
    (relative folders of the server's, e.g. a data dir given as ``big5-data``). Error messages name the
    folders they failed on, for the log; a client's copy must not show the server's layout."""
    for root in sorted({str(r) for r in roots}, key=len, reverse=True):
        if len(root) > 2 and root not in ("..", "./", "~/"):
            text = re.sub(rf"(?<![\w.~/-]){re.escape(root)}{_PATH_CHARS}*", PATH_PLACEHOLDER, text)
    return _ABSOLUTE_PATH.sub(PATH_PLACEHOLDER, text)
