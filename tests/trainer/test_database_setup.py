"""`big5 train` queues and runs its job on one database engine, opened once and disposed at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from big5core import migrate
from big5core.db import Database
from big5core.settings import Settings
from trainer.cli import register


def test_train_queues_and_runs_on_one_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A private SQLite file: the job it leaves queued must not reach another test's worker."""
    import trainer.worker

    opened: list[Database] = []
    disposed: list[Database] = []

    def spy(given: Settings, **kwargs: Any) -> Database:
        db = real(given, **kwargs)
        opened.append(db)
        return db

    real = migrate.open_database
    monkeypatch.setattr(migrate, "open_database", spy)
    monkeypatch.setattr(trainer.worker, "open_database", spy)
    monkeypatch.setattr(Database, "close", lambda self: disposed.append(self) or self.engine.dispose())
    ran: list[Database] = []
    monkeypatch.setattr(trainer.worker.Worker, "run_job", lambda self, job_id: ran.append(self.db))
    monkeypatch.setenv("BIG5_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("BIG5_DATABASE_URL", raising=False)
    monkeypatch.delenv("BIG5_REQUIRE_DATABASE_URL", raising=False)
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["train", "--method", "sft", "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    assert "queued job " in result.output
    assert len(opened) == 1 and ran == opened and disposed == opened
