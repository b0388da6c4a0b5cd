"""The beat loops every background run shares (big5core/heartbeat.py): a beat that raises is retried at the
next, one that returns False ends the loop, and so does the stop event."""

from __future__ import annotations

import asyncio
import threading

import pytest

from big5core.heartbeat import beat_every, keep_beating, owner_id


def test_owner_ids_differ_within_one_process() -> None:
    assert owner_id() != owner_id()


def test_the_thread_loop_retries_a_failed_beat_and_ends_on_false(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def beat() -> bool:
        calls.append(len(calls))
        if len(calls) == 1:
            raise ConnectionError("database away")
        return len(calls) < 3

    beat_every(threading.Event(), 0.001, beat, "job j1")
    assert calls == [0, 1, 2]
    assert "heartbeat of job j1 failed" in caplog.text


def test_the_thread_loop_ends_when_stopped() -> None:
    stop = threading.Event()
    stop.set()
    beat_every(stop, 0.001, lambda: pytest.fail("beat after stop"), "job j1")


def test_the_event_loop_version_retries_ends_on_false_and_on_stop(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    async def beat() -> bool:
        calls.append(len(calls))
        if len(calls) == 1:
            raise ConnectionError("database away")
        return len(calls) < 3

    async def go() -> None:
        await keep_beating(asyncio.Event(), 0.001, beat, "run r1")
        stop = asyncio.Event()
        stop.set()
        await keep_beating(stop, 0.001, beat, "run r2")

    asyncio.run(go())
    assert calls == [0, 1, 2]
    assert "heartbeat of run r1 failed" in caplog.text
