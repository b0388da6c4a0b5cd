"""What the liveness of every background run shares: the owner id of the process that runs it, and the beat loop.

Two lifecycles use it. The training queue's workers hold a lease on the job's row, renewed on the database's
clock from a thread (``big5core.jobs``, ``trainer.lease``); the evaluator's runners write their owner and a
heartbeat time into the run's row from the event loop, and a sweep fails the rows whose heartbeat went stale
(``evaluator.background``). Both name the process that runs a job or a run the same way (:func:`owner_id`)
and beat the same way: every ``interval`` seconds until stopped; a beat that raises (the database away for a
moment) is logged and tried again at the next; a beat that returns False (the lease or the run is gone) ends
the loop. :func:`beat_every` is the loop for a thread, :func:`keep_beating` the one for the event loop.

Merging the two lifecycles themselves (one lease on the database's clock for jobs and runs alike, one reaper
for both) would need lease columns (owner, expiry, attempts) on the assessments' and reasoning runs' tables:
a schema change, not made.
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
