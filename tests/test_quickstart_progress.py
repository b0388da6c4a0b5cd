"""The quickstart's training progress outside a terminal: one line per adapter, with the job's last
recorded step (not the last one a 1 s poll happened to see) and its conditioning accuracy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from sqlalchemy.orm import Session, sessionmaker

from big5.quickstart_training import _job_bar
from big5core import jobs, migrate
from big5core.db import make_engine, session_factory, transaction
from big5core.settings import Settings
from big5core.training import TrainSpec
from trainer.worker import submit


def _record(sessions: sessionmaker[Session], job_id: str, owner: str, progress: dict[str, object]) -> None:
    with transaction(sessions) as session:
        assert jobs.heartbeat(session, job_id, owner, 60, progress)


def test_the_line_of_an_adapter_ends_at_its_last_recorded_step(
    settings: Settings, empty_pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # a database of its own: the job it claims would otherwise be claimable by other tests' workers once its
    # lease runs out
    migrate.upgrade(empty_pg_url)
    engine = make_engine(empty_pg_url)
    sessions = session_factory(engine)
    job_id = submit(settings.model_copy(update={"database_url": empty_pg_url}), TrainSpec(max_steps=20))
    with transaction(sessions) as session:
        assert jobs.claim_next(session, "test-owner", 60, job_id) is not None
    adapter = {"adapter": "sft-unified", "adapter_index": 0, "adapters": 1, "total_steps": 20}
    _record(sessions, job_id, "test-owner", {**adapter, "step": 16, "loss": 2.5, "level/accuracy": 0.5})
    with _job_bar(SimpleNamespace(sessions=sessions), job_id, "sft-unified"):
        # the job finishes between two polls of the bar
        _record(sessions, job_id, "test-owner", {**adapter, "step": 20, "loss": 2.25, "level/accuracy": 1.0})
    engine.dispose()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[train]")]
    assert lines == ["[train] sft-unified sft-unified (1/1): step 20/20, loss 2.250, own level 1.00, 0 s"]
