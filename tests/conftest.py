"""Shared fixtures: a fresh PostgreSQL database per test session, settings, the bundled model.

Markers follow what a test needs, from its fixtures (:func:`pytest_collection_modifyitems`): a test
using the real engine is ``slow``, one using a PostgreSQL fixture is ``pg``. Tests that train mark
themselves ``slow``. Without a reachable PostgreSQL the ``pg`` tests are skipped, loudly (a line in
the summary), except under ``CI``, where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from big5core.db import make_engine, session_factory
from big5core.settings import Settings

PG_ADMIN_URL = os.environ.get("BIG5_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
PG_FIXTURES = frozenset({"pg_url", "empty_pg_url"})  # every other database fixture builds on these
SLOW_FIXTURES = frozenset({"engine"})  # the real vLLM engine (~45 s to start)
NO_PG = "PostgreSQL not reachable"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by what their fixtures need: ``pg`` (a PostgreSQL database), ``slow`` (the engine)."""
    for item in items:
        needed = set(getattr(item, "fixturenames", ()))
        if needed & PG_FIXTURES:
            item.add_marker(pytest.mark.pg)
        if needed & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Say loudly when tests were skipped for want of PostgreSQL (they did not pass: they did not run)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if NO_PG in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep(
            "!",
            f"{len(skipped)} test(s) SKIPPED: {NO_PG} at {PG_ADMIN_URL} "
            "(start it, or set BIG5_TEST_PG_ADMIN_URL; under CI=1 they fail instead)",
            red=True,
            bold=True,
        )


def _require_pg() -> None:
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but not reachable at {PG_ADMIN_URL}")
        pytest.skip(NO_PG)


def _pg_available() -> bool:
    try:
        engine = create_engine(PG_ADMIN_URL)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Where models live: shared across sessions so the bundled model is provisioned once."""
    return Path(os.environ.get("BIG5_DATA_DIR", "./big5-data")).resolve()


@pytest.fixture(scope="session")
def bundled_model_path(data_dir: Path) -> Path:
    from big5engine.modelstore import resolve_base_model

    return Path(resolve_base_model(Settings(data_dir=data_dir)))


def _create_database(prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def _drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database with every migration applied (Alembic), dropped afterwards."""
    _require_pg()
    from big5core import migrate

    url = _create_database("big5_test")
    migrate.upgrade(url)
    yield url
    _drop_database(url)


@pytest.fixture()
def empty_pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (no migrations) for schema tests."""
    _require_pg()
    url = _create_database("big5_empty")
    yield url
    _drop_database(url)


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def pg_sessions(pg_engine: Engine) -> sessionmaker[Session]:
    return session_factory(pg_engine)


@pytest.fixture()
def settings(tmp_path: Path, pg_url: str, data_dir: Path) -> Settings:
    """Settings pointing at the test database, the shared model store and a private data dir."""
    work = tmp_path / "data"
    work.mkdir()
    (work / "models").symlink_to(data_dir / "models", target_is_directory=True)
    return Settings(data_dir=work, database_url=pg_url)


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Iterator[object]:
    """ONE real vLLM engine (LoRA on) on the bundled model for the whole session (~45 s, ~4 GB)."""
    from tests.engine_support import start_test_engine

    started = start_test_engine(tmp_path_factory.mktemp("engine"))
    yield started
    started.shutdown()
