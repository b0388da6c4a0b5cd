"""The one lease of background rows (big5core/lease.py) as the evaluator's runners hold it (evaluator/background.py).

On a real database file: the expiry is compared on the database's clock, so the rule is tested where it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import select

from big5core import lease, migrate
from big5core.db import transaction
from big5core.models import ReasoningRun, ReasoningState
from big5core.settings import ReasoningSettings, Settings
from evaluator.background import RunLeaseInvalid
from evaluator.reasoning.runner import ReasoningRunner


def _runner(database: migrate.Database, **kwargs: Any) -> ReasoningRunner:
    return ReasoningRunner(
        database.sessions, cast(Any, None), cast(Any, None), ReasoningSettings(), evaluate=lambda *_: None, **kwargs
    )


def _run(database: migrate.Database, state: str, lease_values: dict[str, Any]) -> str:
    with transaction(database.sessions) as session:
        run = ReasoningRun(
            personas=["direct"], tasks=["piqa"], item_limit=1, lm_eval_version="0", progress={}, state=state,
            **lease_values,
        )  # fmt: skip
        session.add(run)
        session.flush()
        return run.id


@pytest.fixture()
def database(tmp_path: Path) -> migrate.Database:
    db = migrate.open_database(Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'big5.db'}"))
    yield db  # type: ignore[misc]
    db.close()


def test_the_sweep_fails_exactly_the_live_runs_whose_lease_ran_out(database: migrate.Database) -> None:
    runner = _runner(database)
    live = _run(database, ReasoningState.RUNNING, lease.taken("alive", 600))
    dead = _run(database, ReasoningState.RUNNING, lease.taken("killed", -1))
    queued_dead = _run(database, ReasoningState.QUEUED, lease.taken("killed", -1))
    never = _run(database, ReasoningState.RUNNING, {})  # from before leases: counts as expired
    done = _run(database, ReasoningState.DONE, lease.taken("finished", -1))
    assert runner.expired(dead) and runner.expired(never) and not runner.expired(live)
    assert runner.sweep() == 3
    with database.sessions() as session:
        rows = session.execute(select(ReasoningRun.id, ReasoningRun.state, ReasoningRun.error)).all()
    states, errors = {r.id: r.state for r in rows}, {r.id: r.error for r in rows}
    assert states == {live: "running", dead: "failed", queued_dead: "failed", never: "failed", done: "done"}
    assert errors[dead] == lease.INTERRUPTED and errors[live] is None
    assert runner.sweep() == 0  # a failed run is not swept twice


def test_only_the_holder_renews_a_lease_and_a_renewed_run_is_not_swept(database: migrate.Database) -> None:
    runner, other = _runner(database, lease_seconds=60), _runner(database)
    run_id = _run(database, ReasoningState.RUNNING, lease.taken(runner.owner, -1))  # about to be taken for dead
    assert not other._renew_now(run_id)  # not its lease
    assert runner._renew_now(run_id, {"progress": {"units_done": 1}})
    assert not runner.expired(run_id) and other.sweep() == 0
    with database.sessions() as session:
        row = session.get(ReasoningRun, run_id)
        assert row is not None and row.progress == {"units_done": 1} and row.lease_owner == runner.owner
    with transaction(database.sessions) as session:
        session.get(ReasoningRun, run_id).state = ReasoningState.FAILED  # type: ignore[union-attr]
    assert not runner._renew_now(run_id)  # a run that ended is not renewed, even by its holder


def test_a_heartbeat_at_or_above_the_lease_is_refused(database: migrate.Database) -> None:
    with pytest.raises(RunLeaseInvalid):
        _runner(database, heartbeat_seconds=5, lease_seconds=5)
