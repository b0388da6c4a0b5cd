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
from service.admission import Admission, Admitted
from service.metrics import ServiceMetrics
from service.serving import GenerationService
from service.supervisor import EngineSupervisor


@dataclass
class ServiceState:
    settings: Settings
    stack: Stack
    engine: PersonaEngine
    runner: Admitted[Any]  # the evaluator's AssessmentRunner, built by service/app.py
    reasoning: Admitted[Any]  # the evaluator's ReasoningRunner, likewise
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
