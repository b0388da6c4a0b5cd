"""Wiring of the runtime pieces every entry point needs: database, engine, persona resolver.

Used by the service's lifespan, the ``assess`` command, the quickstart and the benchmarks, so
they all build the same stack from the same settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from big5core.db import Database
from big5core.demos import demo_examples
from big5core.migrate import open_database
from big5core.settings import Settings
from big5engine.modelstore import base_model_id, resolve_base_model
from big5personas.resolver import PersonaResolver

if TYPE_CHECKING:
    from big5engine.engine import PersonaEngine

logger = logging.getLogger(__name__)


@dataclass
class Stack:
    settings: Settings
    db: Engine
    sessions: sessionmaker[Session]
    base_model_path: str
    base_model_id: str
    resolver: PersonaResolver

    def make_engine(self, *, enable_lora: bool = True) -> PersonaEngine:
        from big5engine.engine import PersonaEngine

        return PersonaEngine(
            self.base_model_path,
            self.settings.engine,
            enable_lora=enable_lora,
            work_dir=self.settings.data_dir / "engine",
        )

    @property
    def database(self) -> Database:
        """The stack's database, for a component that shares it (a worker: ``Worker(settings, db=...)``)."""
        return Database(self.db, self.sessions)

    def close(self) -> None:
        self.db.dispose()


def build_stack(settings: Settings, *, migrate_db: bool = True) -> Stack:
    """Database (migrated to head unless told otherwise), base model (provisioned), resolver."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = open_database(settings, migrate_db=migrate_db)
    base_path = resolve_base_model(settings)
    base_id = base_model_id(settings)
    resolver = PersonaResolver(
        settings, database.sessions, base_id, demo_examples=partial(demo_examples, source=settings.demo_dataset)
    )
    return Stack(settings, database.engine, database.sessions, base_path, base_id, resolver)
