"""The staleness rule the two background runners share (evaluator/background.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from evaluator.background import STALE_AFTER, is_stale

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@dataclass
class Row:
    id: str
    progress: Any
    created_at: datetime


@pytest.mark.parametrize(
    ("progress", "created", "stale"),
    [
        ({"heartbeat": (NOW - timedelta(minutes=11)).isoformat()}, NOW, True),
        ({"heartbeat": (NOW - timedelta(minutes=9)).isoformat()}, NOW - timedelta(days=1), False),
        (None, NOW - timedelta(minutes=11), True),  # never beat: its creation counts
        ({}, (NOW - timedelta(minutes=5)).replace(tzinfo=None), False),  # a naive timestamp is UTC
    ],
)
def test_a_run_is_stale_when_its_last_sign_of_life_is_too_old(progress: Any, created: datetime, stale: bool) -> None:
    assert is_stale(Row("r", progress, created), NOW, STALE_AFTER) is stale
