"""Two assessments of a fresh database storing the same built-in inventory: the loser finds the winner's row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from big5core import migrate
from big5core.db import make_engine, session_factory, transaction
from big5core.models import InventoryRecord
from evaluator import store
from evaluator.runner import AssessmentRunner


def test_a_concurrent_first_insert_of_an_inventory_is_not_an_error(tmp_path: Path, monkeypatch: Any) -> None:
    url = f"sqlite:///{tmp_path / 'race.sqlite3'}"
    migrate.upgrade(url)
    sessions = session_factory(make_engine(url))
    real = store.inventory_record
    calls = []

    def racing(session: Any, name: str) -> InventoryRecord:
        calls.append(name)
        if len(calls) == 1:  # another process stores it between our look and our insert
            with transaction(sessions) as other:
                real(other, name)
            session.add(store._record(store.builtin_inventories()[name], builtin=True))
            session.flush()  # our own insert now fails on the unique name
        return real(session, name)

    monkeypatch.setattr(store, "inventory_record", racing)
    runner = AssessmentRunner.__new__(AssessmentRunner)  # only the database is used here
    runner.sessions = sessions
    runner._store_instrument("bfi44", None)

    assert calls == ["bfi44", "bfi44"]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(InventoryRecord)) == 1


def test_another_integrity_error_still_surfaces(tmp_path: Path, monkeypatch: Any) -> None:
    from sqlalchemy.exc import IntegrityError

    url = f"sqlite:///{tmp_path / 'race.sqlite3'}"
    migrate.upgrade(url)
    runner = AssessmentRunner.__new__(AssessmentRunner)
    runner.sessions = session_factory(make_engine(url))

    def always(session: Any, name: str) -> InventoryRecord:
        raise IntegrityError("INSERT", {}, Exception("constraint"))

    monkeypatch.setattr(store, "inventory_record", always)
    with pytest.raises(IntegrityError):
        runner._store_instrument("bfi44", None)


def test_reading_a_built_in_inventory_stores_nothing(tmp_path: Path) -> None:
    """GET /v1/inventories/{name} and compare read a built-in without inserting it, so they cannot race
    an assessment's first insert; what they read is the stored row once there is one."""
    url = f"sqlite:///{tmp_path / 'read.sqlite3'}"
    migrate.upgrade(url)
    sessions = session_factory(make_engine(url))
    with transaction(sessions) as session:
        read = store.load_inventory(session, "bfi44")
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(InventoryRecord)) == 0
    assert read == store.builtin_inventories()["bfi44"]
    with transaction(sessions) as session:
        store.inventory_record(session, "bfi44")
        assert store.load_inventory(session, "bfi44") == read
    with pytest.raises(store.InventoryNotFound), sessions() as session:
        store.load_inventory(session, "no-such-inventory")
