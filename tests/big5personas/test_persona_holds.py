"""A resolved composed persona holds its folder until released, on every path (issue 28)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from big5core.settings import ServiceSettings
from big5engine.compose_cache import ComposedStorageFull
from tests.big5personas.support import Env, spec


def test_holding_releases_when_the_block_fails(env: Env) -> None:
    resolver = env.resolver()
    with pytest.raises(RuntimeError), resolver.holding(spec("sft", openness=0.5, extraversion=0.25)) as persona:
        assert persona.composed and resolver._cache.held() == [persona.adapter_name]
        raise RuntimeError("the request failed after resolve")
    assert resolver._cache.held() == []
    resolver.release(persona)  # releasing again changes nothing
    again = resolver.resolve(spec("sft", openness=0.5, extraversion=0.25))
    other = resolver.resolve(spec("sft", openness=0.5, extraversion=0.25))
    resolver.release(again)
    assert resolver._cache.held() == [other.adapter_name]  # each resolve is a use of its own
    resolver.release(other)
    assert resolver._cache.held() == []


def test_a_cancelled_async_resolve_releases_its_folder(env: Env) -> None:
    resolver = env.resolver()
    composing, go_on = threading.Event(), threading.Event()
    original = resolver._resolve

    def slow_resolve(*args: Any, **kwargs: Any) -> Any:  # holds the thread until the caller is cancelled
        composing.set()
        go_on.wait(30)
        return original(*args, **kwargs)

    resolver._resolve = slow_resolve  # type: ignore[method-assign]

    async def cancelled() -> None:
        task = asyncio.create_task(resolver.aresolve(spec("sft", openness=0.75, neuroticism=-0.5)))
        while not composing.is_set():  # the thread is composing
            await asyncio.sleep(0.01)
        task.cancel()
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 60
        while resolver.stats["composed_misses"] == 0 or resolver._cache.held():
            assert time.monotonic() < deadline, "the cancelled resolve's folder stayed held"
            await asyncio.sleep(0.05)

    asyncio.run(cancelled())
    assert resolver.stats["composed_misses"] == 1 and resolver._cache.held() == []


def test_the_disk_budget_refuses_a_new_vector_with_503(env: Env) -> None:
    settings = env.settings.model_copy(update={"service": ServiceSettings(composed_cache_size=2, composed_max_bytes=1)})
    resolver = env.resolver(settings)
    with pytest.raises(ComposedStorageFull) as refused:
        resolver.resolve(spec("sft", openness=0.5, extraversion=0.25))
    assert refused.value.retry_after > 0  # Unavailable: 503 with Retry-After in the service
    assert not [p for p in resolver.composed_dir.iterdir() if not p.name.startswith(".")]
