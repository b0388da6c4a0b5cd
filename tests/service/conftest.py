"""Fixtures of the service tests: a fresh PostgreSQL database, one stack, random adapters, one app.

All tests use the session's ONE real engine (``engine`` in tests/conftest.py); the apps built here
are given it already started, so they never start or shut down an engine themselves.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, make_url, text

from big5core.settings import Settings
from big5engine.engine import PersonaEngine
from big5personas.stack import Stack, build_stack
from service.app import create_app
from tests.service.support import Loras, build_random_loras

SEEDS = (11, 12, 13, 14, 15)


def _admin_engine(url: str):  # type: ignore[no-untyped-def]
    return create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def service_db(pg_url: str) -> Iterator[str]:
    """A database of its own (the registry rows of these tests never meet other packages' tests)."""
    name = f"big5_service_{uuid.uuid4().hex[:10]}"
    admin = _admin_engine(pg_url)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def service_settings(tmp_path_factory: pytest.TempPathFactory, service_db: str, data_dir: Path) -> Settings:
    work = tmp_path_factory.mktemp("service") / "data"
    work.mkdir()
    (work / "models").symlink_to(data_dir / "models", target_is_directory=True)
    return Settings(data_dir=work, database_url=service_db)


@pytest.fixture(scope="session")
def service_stack(service_settings: Settings) -> Iterator[Stack]:
    stack = build_stack(service_settings)  # migrates the fresh database with Alembic
    yield stack
    stack.close()


@pytest.fixture(scope="session")
def loras(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Loras:
    return Loras(build_random_loras(bundled_model_path, tmp_path_factory.mktemp("loras"), SEEDS))


@pytest.fixture(scope="session")
def published(service_stack: Stack, loras: Loras) -> dict[str, str]:
    """Per-trait SFT adapters: openness high and extraversion low (trait -> ref)."""
    return {
        "openness": loras.publish(service_stack, "svc-openness-high", {"openness": "high"}, 11),
        "extraversion": loras.publish(service_stack, "svc-extraversion-low", {"extraversion": "low"}, 12),
    }


def with_service(settings: Settings, **changes: object) -> Settings:
    """A copy of ``settings`` with some ``service`` fields changed."""
    return settings.model_copy(update={"service": settings.service.model_copy(update=changes)})


@pytest.fixture(scope="module")
def client(
    service_settings: Settings, service_stack: Stack, engine: PersonaEngine, published: dict[str, str]
) -> Iterator[TestClient]:
    app = create_app(service_settings, stack=service_stack, engine=engine)
    with TestClient(app) as test_client:  # runs the lifespan
        yield test_client
