"""Runs assessments: resolve the persona, create the row, administer in the background, store atomically.

A finished assessment is written in one transaction (every response, every score, state done).
Any failure on the way (engine, database) leaves it ``failed`` with the reason; a process that dies
leaves it ``running`` with a stale heartbeat, which :meth:`AssessmentRunner.sweep` marks failed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from big5core.db import transaction
from big5core.models import Assessment, AssessmentState
from big5core.persona import PersonaResolver, ResolvedPersona
from evaluator import store
from evaluator.administer import Engine, administer, score
from evaluator.inventories import Inventory
from evaluator.schemas import AssessRequest

logger = logging.getLogger(__name__)

STALE_AFTER = timedelta(minutes=10)


class AssessmentRunner:
    def __init__(self, sessions: sessionmaker[Session], resolver: PersonaResolver, engine: Engine) -> None:
        self.sessions = sessions
        self.resolver = resolver
        self.engine = engine
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._tasks: set[asyncio.Task[None]] = set()

    def prepare(self, request: AssessRequest) -> tuple[str, ResolvedPersona, Inventory]:
        """Validate and resolve (raising domain errors) and create the queued row; returns its id."""
        resolved = self.resolver.resolve(request.persona)
        with transaction(self.sessions) as session:
            record = store.inventory_record(session, request.inventory)
            inventory = Inventory.model_validate(record.definition)
            assessment = store.create(
                session,
                persona=request.persona.model_dump(mode="json", exclude_none=True),
                resolved=resolved.report(),
                persona_key=resolved.key,
                method=str(request.persona.method),
                inventory=record,
                scoring=request.scoring,
                runs=request.runs,
                options=request.model_dump(mode="json", exclude={"persona", "inventory", "scoring", "runs"}),
            )
            assessment.progress = self._beat({"items_done": 0, "items": len(inventory.items) * request.runs})
            return assessment.id, resolved, inventory

    def submit(self, request: AssessRequest) -> str:
        """Prepare, then run in the background on the current event loop."""
        assessment_id, resolved, inventory = self.prepare(request)
        task = asyncio.get_running_loop().create_task(self.run(assessment_id, request, resolved, inventory))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return assessment_id

    async def run(
        self,
        assessment_id: str,
        request: AssessRequest,
        resolved: ResolvedPersona,
        inventory: Inventory,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        try:
            with transaction(self.sessions) as session:
                store.mark_running(session, assessment_id)
            lora = None
            if resolved.adapter_name is not None and resolved.adapter_path is not None:
                lora = await self.engine.register_lora(resolved.adapter_name, resolved.adapter_path)  # type: ignore[attr-defined]

            def progress(info: dict[str, Any]) -> None:
                with transaction(self.sessions) as session:
                    store.set_progress(session, assessment_id, self._beat(info))
                if on_progress is not None:
                    on_progress(info)

            responses = await administer(self.engine, resolved, inventory, request, lora=lora, progress=progress)
            scores = score(inventory, responses, request.runs)
            with transaction(self.sessions) as session:
                store.complete(session, assessment_id, responses, scores, len(inventory.items) * request.runs)
            logger.info("Assessment %s done (%d responses)", assessment_id, len(responses))
        except asyncio.CancelledError:
            self._fail(assessment_id, "cancelled: the service shut down")
            raise
        except Exception as exc:
            logger.exception("Assessment %s failed", assessment_id)
            await self._fail_eventually(assessment_id, f"{type(exc).__name__}: {exc}")

    def _mark_failed(self, assessment_id: str, error: str) -> None:
        with transaction(self.sessions) as session:
            store.fail(session, assessment_id, error)

    def _fail(self, assessment_id: str, error: str) -> None:
        try:
            self._mark_failed(assessment_id, error)
        except Exception:  # the database itself may be down; the stale heartbeat sweep covers it
            logger.exception("could not mark assessment %s failed", assessment_id)

    async def _fail_eventually(self, assessment_id: str, error: str) -> None:
        """Mark the assessment failed, retrying (1, 2, 4 .. 30 s) while the database is down.

        Gives up after ``STALE_AFTER``, when the stale-heartbeat sweep at the next start takes over.
        """
        deadline = time.monotonic() + STALE_AFTER.total_seconds()
        delay = 1.0
        while True:
            try:
                await asyncio.to_thread(self._mark_failed, assessment_id, error)
                return
            except Exception:
                if time.monotonic() + delay > deadline:
                    logger.exception("could not mark assessment %s failed; the next sweep will", assessment_id)
                    return
                logger.warning("could not mark assessment %s failed yet; retrying in %.0f s", assessment_id, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _beat(self, info: dict[str, Any]) -> dict[str, Any]:
        return {**info, "owner": self.owner, "heartbeat": datetime.now(UTC).isoformat()}

    def sweep(self, stale_after: timedelta = STALE_AFTER) -> int:
        """Fail assessments whose runner stopped beating (a crashed process); returns how many."""
        now = datetime.now(UTC)
        count = 0
        with transaction(self.sessions) as session:
            candidates = session.scalars(
                select(Assessment).where(Assessment.state.in_([AssessmentState.QUEUED, AssessmentState.RUNNING]))
            ).all()
            for assessment in candidates:
                beat = (assessment.progress or {}).get("heartbeat")
                last = datetime.fromisoformat(beat) if beat else assessment.created_at
                if last.tzinfo is None:
                    last = last.replace(tzinfo=UTC)
                if now - last > stale_after:
                    store.fail(session, assessment.id, "interrupted: the process running it stopped")
                    count += 1
        return count

    async def drain(self) -> None:
        """Cancel background assessments (service shutdown); each ends failed."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
