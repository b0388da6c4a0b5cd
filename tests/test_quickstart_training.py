"""The quickstart's training queues and runs its jobs on the stack's database: one process sets up one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from big5.quickstart_training import train_all
from big5core import jobs, migrate
from big5core.db import Database, transaction
from big5core.settings import Settings


def test_training_queues_and_runs_on_the_stacks_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A private SQLite file: the job it leaves behind must not reach another test's worker."""
    import trainer.worker

    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'big5.db'}")
    database = migrate.open_database(settings)
    opened: list[Database] = []

    def spy(given: Settings, **kwargs: Any) -> Database:
        opened.append(real(given, **kwargs))
        return opened[-1]

    real = migrate.open_database
    monkeypatch.setattr(migrate, "open_database", spy)
    monkeypatch.setattr(trainer.worker, "open_database", spy)
    ran: list[Database] = []

    def run(self: trainer.worker.Worker, **_: Any) -> int:
        """Stands in for training (too slow here): claim the queued job and end it succeeded."""
        ran.append(self.db)
        with transaction(self.sessions) as session:
            job = jobs.claim_next(session, self.owner, 60)
            assert job is not None
            assert jobs.succeed(session, job.id, self.owner, {"adapters": {}})
        return 1

    monkeypatch.setattr(trainer.worker.Worker, "run", run)
    stack = SimpleNamespace(settings=settings, sessions=database.sessions, database=database, base_model_id="base")
    try:
        train_all(stack, {"sft-unified": {"method": "sft", "layout": "unified", "max_steps": 1}})
    finally:
        database.close()
    assert opened == [] and ran == [database]
