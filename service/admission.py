"""Admission: at most so many generation, assessment and reasoning requests in flight, no waiting line.

Held by the service's state, used by the generation service for every call and, through :class:`Admitted`,
by the background runners for each run, from its submission to its end.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Generic, Protocol, TypeVar

from service.errors import QueueFull
from service.metrics import ServiceMetrics


class Slot:
    """One admitted request; :meth:`release` is idempotent (streams release when they end)."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release()

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class Admission:
    """At most ``limit`` generation/assessment requests in flight; beyond that :class:`QueueFull`.

    No waiting line: a request that cannot be admitted is answered 503 + Retry-After at once, so a
    burst never piles up behind a slow engine until clients time out. ``what`` names the requests in
    the problem's detail, ``reason`` labels the rejection in the metrics.
    """

    def __init__(
        self,
        limit: int,
        metrics: ServiceMetrics | None = None,
        *,
        what: str = "generation/assessment/reasoning requests",
        reason: str = "queue_full",
    ) -> None:
        self.limit = limit
        self.what = what
        self.reason = reason
        self._metrics = metrics
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def acquire(self) -> Slot:
        with self._lock:
            if self._in_flight >= self.limit:
                full = True
            else:
                full = False
                self._in_flight += 1
        if full:
            if self._metrics is not None:
                self._metrics.observe_rejection(self.reason)
            raise QueueFull(f"{self.limit} {self.what} are in flight; retry shortly")
        return Slot(self)

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1


class BackgroundRunner(Protocol):
    """What :class:`Admitted` needs of a runner: submit a run, find its task, drain them all."""

    async def submit(self, request: Any, **kwargs: Any) -> str: ...

    def task(self, run_id: str) -> asyncio.Task[Any] | None: ...

    async def drain(self) -> None: ...


R = TypeVar("R", bound=BackgroundRunner)


class Admitted(Generic[R]):
    """A background runner behind admission, a wrapper rather than a subclass: every run submitted
    through it holds a slot of ``admission``, and one of ``runs`` when given, from its submission to its
    end (:class:`QueueFull` when either is full). Everything else is the runner's own (:attr:`runner`,
    or any attribute of it read through the wrapper)."""

    def __init__(self, runner: R, admission: Admission, runs: Admission | None = None) -> None:
        self.runner = runner
        self.admission = admission
        self.runs = runs

    async def submit(self, request: Any, **kwargs: Any) -> str:
        slots: list[Slot] = []
        try:
            if self.runs is not None:
                slots.append(self.runs.acquire())
            slots.append(self.admission.acquire())
            run_id = await self.runner.submit(request, **kwargs)
        except BaseException:
            _release(slots)
            raise
        task = self.runner.task(run_id)  # not started yet: nothing ran since submit() created it
        if task is None:
            _release(slots)
        else:
            task.add_done_callback(lambda _: _release(slots))
        return run_id

    async def drain(self) -> None:
        """The runner's drain: its runs are cancelled, and each releases its slots as it ends."""
        await self.runner.drain()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)


def _release(slots: list[Slot]) -> None:
    for slot in slots:
        slot.release()
