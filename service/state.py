"""Everything a running service holds, typed and in one place: :class:`ServiceState`.

The lifespan builds one and stores it as ``app.state.service`` (the only attribute the service puts
on ``app.state``); routes reach it through ``deps.StateDep``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from big5core.settings import Settings
from big5engine.engine import PersonaEngine
from big5personas.stack import Stack
from evaluator.reasoning.runner import ReasoningRunner
from evaluator.runner import AssessmentRunner
from service.admission import Admission, Slot
from service.metrics import ServiceMetrics
from service.serving import GenerationService
from service.supervisor import EngineSupervisor


class _Admitted:
    """A background runner whose every run holds an admission slot, and one of ``runs`` when given,
    from its submission to its end (:class:`QueueFull` when either is full)."""

    def __init__(self, *args: Any, admission: Admission, runs: Admission | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.admission = admission
        self.runs = runs
        self._slots: dict[str, list[Slot]] = {}

    async def submit(self, request: Any, **kwargs: Any) -> str:
        slots: list[Slot] = []
        try:
            if self.runs is not None:
                slots.append(self.runs.acquire())
            slots.append(self.admission.acquire())
            run_id: str = await super().submit(request, **kwargs)  # type: ignore[misc]
        except BaseException:
            for slot in slots:
                slot.release()
            raise
        self._slots[run_id] = slots
        return run_id

    async def run(self, run_id: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().run(run_id, *args, **kwargs)  # type: ignore[misc]
        finally:
            for slot in self._slots.pop(run_id, ()):
                slot.release()

    async def drain(self) -> None:
        await super().drain()  # type: ignore[misc]
        for slots in self._slots.values():
            for slot in slots:
                slot.release()
        self._slots.clear()


class AdmittedRunner(_Admitted, AssessmentRunner):
    """The evaluator's assessment runner, each background assessment holding an admission slot."""


class AdmittedReasoningRunner(_Admitted, ReasoningRunner):
    """The reasoning runner, each run holding an admission slot and one of ``max_reasoning_runs``."""


@dataclass
class ServiceState:
    settings: Settings
    stack: Stack
    engine: PersonaEngine
    runner: AdmittedRunner
    reasoning: AdmittedReasoningRunner
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
