"""The lifecycle the evaluator's background runs share (assessments, reasoning runs).

A run is a row that holds the lease every background row holds (:mod:`big5core.lease`, the training jobs'
too, on the database's clock). The runner that creates or starts a run takes the lease and starts the run as
a task on the caller's event loop, tracked by id; every heartbeat renews the lease while the run goes on (the
owner id and the beat loop: :mod:`big5core.heartbeat`); a live run whose lease ran out belongs to a process
that stopped, and :meth:`BackgroundRunner.sweep` fails it; :meth:`BackgroundRunner.drain` cancels what runs
here (service shutdown), each run then ending failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from sqlalchemy.orm import Session, sessionmaker

from big5core import lease
from big5core.db import transaction
from big5core.errors import Invalid
from big5core.heartbeat import owner_id

LEASE_SECONDS = 600  # a run whose runner has not renewed it for 10 min is taken for dead
HEARTBEAT_SECONDS = 30.0  # well inside the lease, however long one run of an inventory takes


class RunLeaseInvalid(Invalid):
    code, title = "run-lease-invalid", "The heartbeat interval must be shorter than the lease"


class BackgroundRunner:
    """Owner id, the runs' lease, transactions, the runs' tasks and their drain: what both runners share.

    A subclass names its table (``model``), the states in which a run is live and the one it ends in when it
    fails.
    """

    model: ClassVar[type[Any]]
    live: ClassVar[tuple[str, ...]]
    failed: ClassVar[str]

    def __init__(
        self, sessions: sessionmaker[Session], heartbeat_seconds: float, lease_seconds: int | float = LEASE_SECONDS
    ) -> None:
        if not lease.renewed_in_time(heartbeat_seconds, lease_seconds):
            raise RunLeaseInvalid(f"heartbeat {heartbeat_seconds} s is not below the run's lease ({lease_seconds} s)")
        self.sessions = sessions
        self.heartbeat_seconds = heartbeat_seconds
        self.lease_seconds = lease_seconds
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

    def _lease(self) -> dict[str, Any]:
        """The lease columns of a run this runner takes (at creation, or when it starts or resumes it)."""
        return lease.taken(self.owner, self.lease_seconds)

    def _hold(self, row: Any) -> None:
        """Take the lease on a run row this runner has just created (flushed with the rest of the row)."""
        for column, value in self._lease().items():
            setattr(row, column, value)

    def _renew(self, session: Session, run_id: str, values: dict[str, Any] | None = None) -> bool:
        """Renew this runner's lease on the run (with ``values``); False when it no longer holds it live."""
        return lease.renew(session, self.model, run_id, self.owner, self.lease_seconds, self.live, values)

    def _renew_now(self, run_id: str, values: dict[str, Any] | None = None) -> bool:
        with transaction(self.sessions) as session:
            return self._renew(session, run_id, values)

    def _in_transaction(self, operation: Callable[..., Any], *args: Any) -> None:
        with transaction(self.sessions) as session:
            operation(session, *args)

    def expired(self, run_id: str) -> bool:
        """Whether the run's lease ran out (nobody renews it: its process stopped)."""
        with self.sessions() as session:
            return lease.is_expired(session, self.model, run_id)

    def sweep(self) -> int:
        """Fail the live runs whose lease expired (a crashed process); returns how many."""
        with transaction(self.sessions) as session:
            return len(lease.sweep(session, self.model, self.live, self.failed))
