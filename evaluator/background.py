"""The lifecycle the evaluator's background runs share (assessments, reasoning runs).

A run is a row with a ``progress`` JSON that carries its runner's ``owner`` and ``heartbeat``. The runner
starts each run as a task on the caller's event loop and tracks it by id; a heartbeat refreshes the
row while it runs (the owner id and the beat loop are the training workers' too, :mod:`big5core.heartbeat`);
a run whose heartbeat is older than :data:`STALE_AFTER` belongs to a process that stopped, and
:meth:`BackgroundRunner._sweep` fails it; :meth:`BackgroundRunner.drain` cancels what runs here (service
shutdown), each run then ending failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from big5core.db import transaction
from big5core.heartbeat import owner_id

STALE_AFTER = timedelta(minutes=10)
HEARTBEAT_SECONDS = 30.0  # well inside STALE_AFTER, however long one run of an inventory takes
INTERRUPTED = "interrupted: the process running it stopped"


class RunRow(Protocol):
    """The columns of a run's row that the lifecycle reads."""

    id: Any
    progress: Any
    created_at: Any


def is_stale(row: RunRow, now: datetime, stale_after: timedelta) -> bool:
    """Whether the row's heartbeat (its creation when it never beat) is older than ``stale_after``."""
    beat = (row.progress or {}).get("heartbeat")
    last = datetime.fromisoformat(beat) if beat else row.created_at
    if last.tzinfo is None:
        last = last.replace(tzinfo=UTC)
    return bool(now - last > stale_after)


class BackgroundRunner:
    """Owner id, heartbeats, transactions, the runs' tasks and their drain: what both runners share."""

    def __init__(self, sessions: sessionmaker[Session], heartbeat_seconds: float) -> None:
        self.sessions = sessions
        self.heartbeat_seconds = heartbeat_seconds
        self.owner = owner_id()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._by_id: dict[str, asyncio.Task[Any]] = {}  # runs of this runner in progress

    def _start(self, run_id: str, run: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``run`` in the background on the current event loop, tracked under ``run_id``."""
        task = asyncio.get_running_loop().create_task(run)
        self._tasks.add(task)
        self._by_id[run_id] = task
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._by_id.pop(run_id, None))
        return task

    def task(self, run_id: str) -> asyncio.Task[Any] | None:
        """The background task running ``run_id`` here (None once it ended, or elsewhere)."""
        return self._by_id.get(run_id)

    def running(self, run_id: str) -> bool:
        """Whether this runner is running ``run_id`` now."""
        return run_id in self._by_id

    async def drain(self) -> None:
        """Cancel the background runs (service shutdown); each ends failed."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _beat(self, info: dict[str, Any]) -> dict[str, Any]:
        return {**info, "owner": self.owner, "heartbeat": datetime.now(UTC).isoformat()}

    def _in_transaction(self, operation: Callable[..., Any], *args: Any) -> None:
        with transaction(self.sessions) as session:
            operation(session, *args)

    def _sweep(
        self,
        model: type[Any],
        live: Iterable[str],
        fail: Callable[[Session, str, str], Any],
        stale_after: timedelta,
    ) -> int:
        """Fail the live rows of ``model`` whose heartbeat is stale (a crashed process); returns how many."""
        now = datetime.now(UTC)
        count = 0
        with transaction(self.sessions) as session:
            for row in session.scalars(select(model).where(model.state.in_(list(live)))).all():
                if is_stale(row, now, stale_after):
                    fail(session, row.id, INTERRUPTED)
                    count += 1
        return count
