"""The engine's supervisor: the service outlives a dead engine core, or exits for a supervisor to replace it.

vLLM marks its ``AsyncLLM`` errored when the engine core process dies (OOM killer, a crash in a
kernel); it never recovers by itself. :class:`EngineSupervisor` watches the engine, restarts it in
this process (:meth:`PersonaEngine.restart`, which brings the loaded adapters back) and retries with
exponential backoff; requests meanwhile get 503 ``engine-not-ready`` with Retry-After. After
``engine_restarts`` failures in a row it gives up: ``/health`` turns 503 ``error`` and
``on_give_up`` runs (``big5 serve`` stops uvicorn and exits non-zero, so Compose's ``restart:`` or
a Kubernetes liveness probe on ``/health`` replaces the process). An engine this service starts is
supervised from its first start: a start that fails is retried the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0


class Supervisable(Protocol):
    @property
    def dead(self) -> bool: ...

    async def astart(self) -> None: ...

    async def arestart(self) -> bool: ...


class EngineSupervisor:
    """Watch ``engine`` every ``poll_s``; restart it when it died; give up after ``restarts`` failed tries."""

    def __init__(
        self,
        engine: Supervisable,
        *,
        restarts: int,
        backoff_s: float,
        on_give_up: Callable[[str], None] | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self.engine = engine
        self.attempts = max(1, restarts)
        self.backoff_s = backoff_s
        self.on_give_up = on_give_up
        self.poll_s = poll_s
        self.recovering = False  # between a death (or failed start) and the next success or giving up
        self.gave_up: str | None = None  # why, once it has

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (1-based): none before the first, then doubling."""
        return 0.0 if attempt <= 1 else min(self.backoff_s * 2 ** (attempt - 2), MAX_BACKOFF_S)

    async def run(self, *, start: bool = False) -> None:
        """Start the engine first when ``start``; then watch it until cancelled or given up."""
        if start and not await self._recover(self.engine.astart, "start"):
            return
        while True:
            await asyncio.sleep(self.poll_s)
            if self.engine.dead and not await self._recover(self.engine.arestart, "restart"):
                return

    async def _recover(self, attempt_once: Callable[[], Awaitable[object]], what: str) -> bool:
        self.recovering = True
        last = ""
        try:
            for attempt in range(1, self.attempts + 1):
                await asyncio.sleep(self.delay(attempt))
                try:
                    await attempt_once()
                except Exception as exc:  # recorded on the engine (its error) and logged there
                    last = f"{type(exc).__name__}: {exc}"
                    logger.warning("Engine %s attempt %d failed: %s", what, attempt, last)
                    continue
                if attempt > 1 or what == "restart":
                    logger.info("Engine %s succeeded (attempt %d)", what, attempt)
                return True
        finally:
            self.recovering = False
        self.gave_up = f"engine {what} failed {self.attempts} time(s) in a row; last: {last}"
        logger.critical("Giving up: %s", self.gave_up)
        if self.on_give_up is not None:
            self.on_give_up(self.gave_up)
        return False
