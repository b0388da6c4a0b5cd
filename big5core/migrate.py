"""Programmatic Alembic: upgrade, downgrade and drift checks against the shared metadata."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from big5core.db import Database, engine_for, make_engine, session_factory
from big5core.models import Base
from big5core.settings import Settings

_UPGRADE_LOCK = 0x6269673543484154  # "big5CHAT": the PostgreSQL advisory lock held while upgrading


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def ensure_current(url: str) -> bool:
    """Upgrade the database to head unless it is there already; True when it upgraded.

    Every entry point (service, worker, ``big5 train``/``jobs``/``assess``) calls this, so a fresh
    SQLite file or an empty Postgres database just works. On PostgreSQL concurrent callers (several
    workers starting at once) queue on an advisory lock and the later ones find the schema current.
    """
    engine = make_engine(url)
    try:
        head = head_revision(url)
        if current_revision(engine) == head:
            return False
        if engine.dialect.name != "postgresql":
            upgrade(url)
            return True
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _UPGRADE_LOCK})
            try:
                if current_revision(engine) == head:
                    return False
                upgrade(url)
                return True
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _UPGRADE_LOCK})
                conn.commit()
    finally:
        engine.dispose()


def open_database(settings: Settings, *, migrate_db: bool = True) -> Database:
    """The one way a process sets up its database: migrated to head (unless told otherwise), one engine,
    its session factory. Close what it returns (or use it in a ``with``)."""
    if migrate_db:
        ensure_current(settings.resolved_database_url)
    engine = engine_for(settings)
    return Database(engine, session_factory(engine))


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def drift(engine: Engine) -> list[object]:
    """Differences between the ORM models and the migrated database (empty when in sync)."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))
