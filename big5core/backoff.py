"""Exponential backoff, the one rule: ``base``, twice that, four times ... never above ``cap``.

Used by the engine supervisor between restart attempts and by the assessment runner while the
database is down.
"""

from __future__ import annotations

from collections.abc import Iterator


def backoff_delay(step: int, base: float, cap: float) -> float:
    """The wait before retry ``step`` (0-based): ``min(base * 2**step, cap)``."""
    return min(base * 2**step, cap)


def backoff_delays(base: float, cap: float) -> Iterator[float]:
    """``backoff_delay`` for steps 0, 1, 2, ... (endless)."""
    step = 0
    while True:
        yield backoff_delay(step, base, cap)
        step += 1
