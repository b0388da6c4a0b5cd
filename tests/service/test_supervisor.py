"""The supervisor's restart budget over a time window (issue 28).

A real engine restart takes ~45 s on these CPUs, so a flapping engine (its core dying again after each
successful restart) is played by a stand-in that satisfies ``Supervisable``: it dies on demand and
restarts at once. The real engine's restarts are tested in test_engine_restart.py.
"""

from __future__ import annotations

import asyncio

from service.supervisor import EngineSupervisor


class FlappingEngine:
    """Stands in for PersonaEngine: ``restarts`` succeed at once; ``kill()`` makes it dead again."""

    def __init__(self) -> None:
        self.dead = False
        self.restarts = 0

    def kill(self) -> None:
        self.dead = True

    async def astart(self) -> None:
        self.dead = False

    async def arestart(self) -> bool:
        self.restarts += 1
        self.dead = False
        return True


def test_restarts_beyond_the_window_budget_give_up() -> None:
    lost: list[str] = []
    now = [0.0]

    async def scenario() -> tuple[EngineSupervisor, FlappingEngine]:
        engine = FlappingEngine()
        supervisor = EngineSupervisor(
            engine,
            restarts=5,
            backoff_s=0.01,
            on_give_up=lost.append,
            poll_s=0.001,
            window_restarts=3,
            window_s=60.0,
            clock=lambda: now[0],
        )
        task = asyncio.create_task(supervisor.run())
        for _ in range(3):  # three deaths, each restarted successfully
            engine.kill()
            while engine.dead:
                await asyncio.sleep(0.001)
            now[0] += 10.0
        now[0] += 31.0  # the first restart (at t=0) is now older than the window: one more fits
        engine.kill()
        while engine.dead:
            await asyncio.sleep(0.001)
        assert not lost and engine.restarts == 4
        engine.kill()  # the fourth restart within 60 s (at t=10, 20, 61, now 61): give up
        await asyncio.wait_for(task, 5)
        return supervisor, engine

    supervisor, engine = asyncio.run(scenario())
    assert engine.restarts == 4 and engine.dead  # not restarted a fifth time
    assert lost and "more than 3 restart(s) within 60 s" in lost[0]
    assert supervisor.gave_up == lost[0]
