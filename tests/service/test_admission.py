"""Admission around a background runner (service.admission.Admitted): a slot from submission to the run's end.

A stand-in runner with the three methods the wrapper needs (the real runners need the engine; their
admission is exercised end to end in test_resource_limits.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.admission import Admission, Admitted
from service.errors import QueueFull


class Runner:
    """Runs each submitted request until its event is set; ``fail`` makes submit raise."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.fail = False
        self.label = "the runner's own attribute"

    async def submit(self, request: Any, **kwargs: Any) -> str:
        if self.fail:
            raise ValueError("bad request")
        run_id = f"run-{len(self.events)}"
        self.events[run_id] = asyncio.Event()
        self.tasks[run_id] = asyncio.get_running_loop().create_task(self.events[run_id].wait())  # type: ignore[arg-type]
        return run_id

    def task(self, run_id: str) -> asyncio.Task[None] | None:
        task = self.tasks.get(run_id)
        return None if task is None or task.done() else task

    async def drain(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


def test_each_run_holds_its_slots_until_it_ends() -> None:
    async def scenario() -> None:
        runner, admission, runs = Runner(), Admission(3), Admission(1, what="runs")
        admitted = Admitted(runner, admission, runs=runs)
        first = await admitted.submit("a")
        assert (admission.in_flight, runs.in_flight) == (1, 1)
        with pytest.raises(QueueFull, match="1 runs are in flight"):
            await admitted.submit("b")
        assert (admission.in_flight, runs.in_flight) == (1, 1)  # the refused one holds nothing
        runner.events[first].set()
        await runner.tasks[first]
        await asyncio.sleep(0)
        assert (admission.in_flight, runs.in_flight) == (0, 0)
        runner.fail = True
        with pytest.raises(ValueError, match="bad request"):
            await admitted.submit("c")
        assert (admission.in_flight, runs.in_flight) == (0, 0)
        runner.fail = False
        await admitted.submit("d")
        await admitted.drain()
        assert (admission.in_flight, runs.in_flight) == (0, 0)
        assert admitted.label == "the runner's own attribute" and admitted.runner is runner

    asyncio.run(scenario())
