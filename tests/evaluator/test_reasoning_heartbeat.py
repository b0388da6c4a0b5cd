"""The reasoning runner's heartbeat (the shared loop of big5core/heartbeat.py): it renews the run's lease while
the run goes on, and stops the run once its row is no longer running (cancelled by another replica)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from big5core import migrate
from big5core.db import transaction
from big5core.models import ReasoningRun
from big5core.settings import ReasoningSettings, Settings
from evaluator.reasoning import store
from evaluator.reasoning.runner import ReasoningRunner


def test_the_heartbeat_refreshes_the_row_and_stops_a_run_cancelled_elsewhere(tmp_path: Path) -> None:
    """A private SQLite file: the run row must not reach another test's sweep."""
    database = migrate.open_database(Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'big5.db'}"))
    runner = ReasoningRunner(
        database.sessions, cast(Any, None), cast(Any, None), ReasoningSettings(), heartbeat_seconds=0.05,
        evaluate=lambda *_: None,
    )  # fmt: skip
    progress: dict[str, Any] = {"units_done": 0, "units": 1}
    with transaction(database.sessions) as session:
        run = ReasoningRun(personas=["direct"], tasks=["piqa"], item_limit=1, lm_eval_version="0", progress={})
        session.add(run)
        session.flush()
        run_id = run.id
        store.mark_running(session, run_id, dict(progress), runner._lease())

    def heartbeat() -> str:
        with database.sessions() as session:
            row = session.get(ReasoningRun, run_id)
            assert row is not None
            return str(row.lease_expires_at)

    async def go() -> tuple[set[str], bool]:
        work = asyncio.create_task(asyncio.sleep(60))  # stands in for the run's units
        stop = asyncio.Event()
        beating = asyncio.create_task(runner._keep_beating(run_id, progress, stop, work))
        beats = set()
        for _ in range(4):
            await asyncio.sleep(0.08)
            beats.add(await asyncio.to_thread(heartbeat))
        await asyncio.to_thread(runner._in_transaction, store.fail, run_id, "cancelled by another replica")
        await asyncio.wait_for(beating, 5)  # the next beat sees the row failed and ends the loop
        await asyncio.gather(work, return_exceptions=True)
        return beats, work.cancelled()

    try:
        beats, cancelled = asyncio.run(go())
    finally:
        database.close()
    assert len(beats) >= 2 and cancelled
