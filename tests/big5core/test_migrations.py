"""Schema: upgrade, downgrade, upgrade on empty PostgreSQL and SQLite; models never drift from migrations."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect

from big5core import migrate
from big5core.db import make_engine
from big5core.models import Base

TABLES = {
    "adapters",
    "training_jobs",
    "inventories",
    "inventory_items",
    "assessments",
    "item_responses",
    "trait_scores",
    "reasoning_runs",
    "reasoning_results",
    "reasoning_items",
}


def _round_trip(url: str) -> None:
    engine = make_engine(url)
    try:
        migrate.upgrade(url)
        assert set(inspect(engine).get_table_names()) >= TABLES
        assert migrate.drift(engine) == []
        migrate.downgrade(url, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        migrate.upgrade(url)
        assert migrate.current_revision(engine) is not None
        assert migrate.drift(engine) == []
    finally:
        engine.dispose()


def test_round_trip_postgres(empty_pg_url: str) -> None:
    _round_trip(empty_pg_url)


def test_round_trip_sqlite(tmp_path: Path) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'db.sqlite3'}")


def test_drift_is_detected(empty_pg_url: str) -> None:
    """The drift check must fail when a model gains a column that no migration creates."""
    from sqlalchemy import Column, String

    migrate.upgrade(empty_pg_url)
    engine = make_engine(empty_pg_url)
    column = Column("not_migrated", String(8))
    table = Base.metadata.tables["adapters"]
    table.append_column(column)
    try:
        diffs = migrate.drift(engine)
    finally:
        table._columns.remove(column)  # restore the metadata for other tests
        engine.dispose()
    assert any("not_migrated" in repr(d) for d in diffs), diffs


@pytest.mark.parametrize("url_kind", ["sqlite"])
def test_cli_db_upgrade(tmp_path: Path, url_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from big5.cli import app

    monkeypatch.setenv("BIG5_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("BIG5_DATABASE_URL", raising=False)
    result = CliRunner().invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    engine = make_engine(f"sqlite:///{tmp_path / 'big5.sqlite3'}")
    assert set(inspect(engine).get_table_names()) >= TABLES
    engine.dispose()


def test_ensure_current_upgrades_a_fresh_sqlite_file_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert migrate.ensure_current(url) is True
    assert migrate.ensure_current(url) is False
    engine = make_engine(url)
    assert migrate.current_revision(engine) == migrate.head_revision(url)
    assert migrate.drift(engine) == []
    engine.dispose()


def test_ensure_current_concurrent_on_postgres(empty_pg_url: str) -> None:
    """Several workers starting at once on an empty database: one upgrades, none fails."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        upgraded = list(pool.map(lambda _: migrate.ensure_current(empty_pg_url), range(4)))
    assert upgraded.count(True) == 1
    engine = make_engine(empty_pg_url)
    assert migrate.current_revision(engine) == migrate.head_revision(empty_pg_url)
    engine.dispose()


def test_trainer_commands_work_on_a_fresh_data_dir(tmp_path: Path) -> None:
    """`big5 jobs list` on a machine that never ran anything: the default SQLite file is created and migrated."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "BIG5_DATA_DIR": str(tmp_path / "data")}
    env.pop("BIG5_DATABASE_URL", None)
    done = subprocess.run([sys.executable, "-m", "big5.cli", "jobs", "list"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "data").is_dir()
