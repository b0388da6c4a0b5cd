"""Fixtures the evaluator's tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from big5core.settings import Settings
from big5personas.stack import Stack, build_stack


@pytest.fixture()
def stack(settings: Settings) -> Iterator[Stack]:
    """A migrated stack on the test database (closed after the test)."""
    built = build_stack(settings)
    yield built
    built.close()
