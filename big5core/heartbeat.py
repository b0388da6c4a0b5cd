"""What the liveness of every background run shares: the owner id of the process that runs it, and the beat loop.

Every background row (a training job, an assessment, a reasoning run) holds one kind of lease, on the
database's clock (:mod:`big5core.lease`). Its owner is named by :func:`owner_id` and renews the lease in a beat
loop: every ``interval`` seconds until stopped; a beat that raises (the database away for a moment) is logged
and tried again at the next; a beat that returns False (the lease is lost, the row cancelled) ends the loop.
:func:`beat_every` is the loop for a thread (the training workers, ``trainer.lease``), :func:`keep_beating` the
one for the event loop (the evaluator's runners, ``evaluator.background``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


def owner_id() -> str:
    """``host:pid:random``: who runs a job or a run (unique per worker or runner, also within one process)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def beat_every(stop: threading.Event, interval: float, beat: Callable[[], bool | None], what: str) -> None:
    """Call ``beat`` every ``interval`` seconds until ``stop`` is set or it returns False (blocks: a thread's loop)."""
    while not stop.wait(interval):
        try:
            if beat() is False:
                return
        except Exception:  # the next beat retries; the lease or the stale window covers the gap
            logger.warning("heartbeat of %s failed", what, exc_info=True)


async def keep_beating(
    stop: asyncio.Event, interval: float, beat: Callable[[], Awaitable[bool | None]], what: str
) -> None:
    """Await ``beat`` every ``interval`` seconds until ``stop`` is set or it returns False (on the event loop)."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            try:
                if await beat() is False:
                    return
            except Exception:  # the next beat retries; the stale window covers the gap
                logger.warning("heartbeat of %s failed", what, exc_info=True)
