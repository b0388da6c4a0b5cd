"""The engine's supervisor: the service outlives a dead engine core, or exits for a supervisor to replace it.

vLLM marks its ``AsyncLLM`` errored when the engine core process dies (OOM killer, a crash in a
kernel); it never recovers by itself. :class:`EngineSupervisor` watches the engine, restarts it in
this process (:meth:`PersonaEngine.restart`, which brings the loaded adapters back) and retries with
exponential backoff; requests and ``/health`` meanwhile get 503 ``engine-not-ready`` with Retry-After.
It gives up after ``engine_restarts`` failures in a row, and also when the engine dies more often than
``engine_window_restarts`` times within ``engine_restart_window_s`` (each restart succeeding, the core
dying again: a flapping engine is not recovered in-process forever): ``/health`` turns 503
``engine-lost`` and ``on_give_up`` runs (``big5 serve`` stops uvicorn and exits non-zero, so Compose's
``restart:`` or Kubernetes replaces the process). An engine this service starts is supervised from its
first start: a start that fails is retried the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from big5core.backoff import backoff_delay
from big5core.errors import Unavailable

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0


class EngineLost(Unavailable):
    """The engine failed and this process will not bring it back (it exits for its supervisor)."""

    code, title, retry_after = "engine-lost", "The engine failed and will not come back in this process", 30


class Supervisable(Protocol):
    @property
    def dead(self) -> bool: ...

    async def astart(self) -> None: ...

    async def arestart(self) -> bool: ...


class EngineSupervisor:
    """Watch ``engine`` every ``poll_s``; restart it when it died; give up after ``restarts`` failed tries
    in a row, or when restarting it would make more than ``window_restarts`` restarts within ``window_s``."""

    def __init__(
        self,
        engine: Supervisable,
        *,
        restarts: int,
        backoff_s: float,
        on_give_up: Callable[[str], None] | None = None,
        poll_s: float = 0.5,
        window_restarts: int | None = None,
        window_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.attempts = max(1, restarts)
        self.backoff_s = backoff_s
        self.on_give_up = on_give_up
        self.poll_s = poll_s
        self.window_restarts = window_restarts
        self.window_s = window_s
        self._clock = clock
        self._restarted: deque[float] = deque()  # when each restart attempt began, within the window
        self.recovering = False  # between a death (or failed start) and the next success or giving up
        self.gave_up: str | None = None  # why, once it has

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (1-based): none before the first, then doubling."""
        return 0.0 if attempt <= 1 else backoff_delay(attempt - 2, self.backoff_s, MAX_BACKOFF_S)

    async def run(self, *, start: bool = False) -> None:
        """Start the engine first when ``start``; then watch it until cancelled or given up."""
        if start and not await self._recover(self.engine.astart, "start"):
            return
        while True:
            await asyncio.sleep(self.poll_s)
            if self.engine.dead and not await self._recover(self.engine.arestart, "restart"):
                return

    def _window_full(self) -> bool:
        """Whether one more restart would exceed ``window_restarts`` within ``window_s`` (else it is counted)."""
        if self.window_restarts is None:
            return False
        now = self._clock()
        while self._restarted and now - self._restarted[0] > self.window_s:
            self._restarted.popleft()
        if len(self._restarted) >= self.window_restarts:
            return True
        self._restarted.append(now)
        return False

    def _give_up(self, reason: str) -> None:
        self.gave_up = reason
        logger.critical("Giving up: %s", reason)
        if self.on_give_up is not None:
            self.on_give_up(reason)

    async def _recover(self, attempt_once: Callable[[], Awaitable[object]], what: str) -> bool:
        self.recovering = True
        last = ""
        try:
            for attempt in range(1, self.attempts + 1):
                await asyncio.sleep(self.delay(attempt))
                if what == "restart" and self._window_full():
                    self._give_up(
                        f"the engine needed more than {self.window_restarts} restart(s) within "
                        f"{self.window_s:g} s; exiting for the process supervisor"
                    )
                    return False
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
        self._give_up(f"engine {what} failed {self.attempts} time(s) in a row; last: {last}")
        return False
