"""Everything a running service holds, typed and in one place: :class:`ServiceState`.

The lifespan builds one and stores it as ``app.state.service`` (the only attribute the service puts
on ``app.state``); routes reach it through ``deps.StateDep``.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from big5core.engine import PersonaEngine
from big5core.settings import Settings
from big5core.stack import Stack
from evaluator.runner import AssessmentRunner
from service.errors import QueueFull
from service.metrics import ServiceMetrics

if TYPE_CHECKING:
    from service.serving import GenerationService
    from service.supervisor import EngineSupervisor


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
    burst never piles up behind a slow engine until clients time out.
    """

    def __init__(self, limit: int, metrics: ServiceMetrics | None = None) -> None:
        self.limit = limit
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
                self._metrics.observe_rejection("queue_full")
            raise QueueFull(f"{self.limit} generation/assessment requests are in flight; retry shortly")
        return Slot(self)

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1


class AdmittedRunner(AssessmentRunner):
    """The evaluator's runner, with each background assessment holding an admission slot."""

    def __init__(self, *args: Any, admission: Admission, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.admission = admission
        self._slots: dict[str, Slot] = {}

    async def submit(self, request: Any) -> str:
        slot = self.admission.acquire()
        try:
            assessment_id = await super().submit(request)
        except BaseException:
            slot.release()
            raise
        self._slots[assessment_id] = slot
        return assessment_id

    async def run(self, assessment_id: str, *args: Any, **kwargs: Any) -> None:
        try:
            await super().run(assessment_id, *args, **kwargs)
        finally:
            slot = self._slots.pop(assessment_id, None)
            if slot is not None:
                slot.release()

    async def drain(self) -> None:
        await super().drain()
        for slot in self._slots.values():
            slot.release()
        self._slots.clear()


@dataclass
class ServiceState:
    settings: Settings
    stack: Stack
    engine: PersonaEngine
    runner: AdmittedRunner
    serving: GenerationService
    admission: Admission
    metrics: ServiceMetrics
    owns_stack: bool = False
    owns_engine: bool = False  # True when this app started the engine (so it shuts it down)
    engine_task: asyncio.Task[None] | None = None  # the supervisor's (it starts an engine this app owns)
    supervisor: EngineSupervisor | None = None
    known_adapters: set[str] = field(default_factory=set)  # ready refs seen by start-up or a reload
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def health(self) -> str:
        """ready; loading (first start); restarting (the core died, a restart is due or under way);
        error (the engine failed and nothing will bring it back: the supervisor gave up, or none runs)."""
        if self.engine.ready:
            return "ready"
        supervisor = self.supervisor
        if supervisor is not None and supervisor.gave_up:
            return "error"
        if self.engine.dead and (supervisor is not None or self.engine.starting):
            return "restarting"
        if self.engine.starting or (supervisor is not None and supervisor.recovering):
            return "loading"
        return "error" if self.engine.error else "loading"
