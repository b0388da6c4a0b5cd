"""Admission: at most so many generation, assessment and reasoning requests in flight, no waiting line.

Held by the service's state, used by the generation service for every call and by the background runners
for each run, from its submission to its end.
"""

from __future__ import annotations

import threading

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
