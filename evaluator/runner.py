"""Runs assessments: resolve the persona, create the row, administer in the background, store atomically.

A finished assessment is written in one transaction (every response, every score, state done).
Any failure on the way (engine, database) leaves it ``failed`` with the reason; a process that dies
leaves it ``running`` under a lease nobody renews, which :meth:`AssessmentRunner.sweep` marks failed once it
expires (the lease: :mod:`evaluator.background`).

Database work runs in worker threads (``asyncio.to_thread``), never on the event loop: a database
that hangs (a lock, a stalled network) holds up the assessments that need it, not the service's
other requests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from big5core.backoff import backoff_delays
from big5core.db import transaction
from big5core.heartbeat import keep_beating
from big5core.models import Assessment, AssessmentState
from big5personas.resolver import PersonaResolver, ResolvedPersona
from evaluator import dialogue, store
from evaluator.administer import Engine, administer, score
from evaluator.background import HEARTBEAT_SECONDS, LEASE_SECONDS, BackgroundRunner
from evaluator.inventories import DIALOGUE_INVENTORY, Inventory
from evaluator.judge import JudgeStore
from evaluator.schemas import AssessRequest

Instrument = Inventory | dialogue.DialogueSet
"""What an assessment administers: a questionnaire, or the dialogue assessment's Speaker X turns."""

logger = logging.getLogger(__name__)


class AssessmentRunner(BackgroundRunner):
    model = Assessment
    live = (AssessmentState.QUEUED, AssessmentState.RUNNING)
    failed = AssessmentState.FAILED

    def __init__(
        self,
        sessions: sessionmaker[Session],
        resolver: PersonaResolver,
        engine: Engine,
        *,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        lease_seconds: int | float = LEASE_SECONDS,
        judges: JudgeStore | None = None,
    ) -> None:
        super().__init__(sessions, heartbeat_seconds, lease_seconds)
        self.resolver = resolver
        self.engine = engine
        settings = resolver.settings
        self.judges = judges or JudgeStore(settings.data_dir / "judges", settings.evaluator.judge_dataset)
        self._dialogue_source = (settings.evaluator.dialogue_source, settings.evaluator.dialogue_split)
        self._dialogue: dialogue.DialogueSet | None = None

    def dialogue_set(self) -> dialogue.DialogueSet:
        """The dialogue assessment's Speaker X turns (read once per runner)."""
        if self._dialogue is None:
            self._dialogue = dialogue.load_dialogue_set(*self._dialogue_source)
        return self._dialogue

    def _expected(self, instrument: Instrument, request: AssessRequest) -> int:
        if isinstance(instrument, dialogue.DialogueSet):
            n = len(instrument.items) if request.max_items is None else min(request.max_items, len(instrument.items))
            return n * request.runs
        return len(instrument.items) * request.runs

    def prepare(
        self, request: AssessRequest, *, owner_key: str | None = None
    ) -> tuple[str, ResolvedPersona, Instrument]:
        """Validate and resolve (raising domain errors) and create the queued row (recording ``owner_key``,
        the id of the API key asking); returns its id.

        The persona comes back held (a composed adapter's folder): :meth:`run` releases it when it ends.
        """
        resolved = self.resolver.resolve(request.persona)
        try:
            return self._create(request, resolved, owner_key=owner_key)
        except BaseException:
            self.resolver.release(resolved)
            raise

    def _create(
        self, request: AssessRequest, resolved: ResolvedPersona, *, owner_key: str | None
    ) -> tuple[str, ResolvedPersona, Instrument]:
        options = request.model_dump(mode="json", exclude={"persona", "inventory", "scoring", "runs"})
        turns: dialogue.DialogueSet | None = None
        if request.inventory == DIALOGUE_INVENTORY:
            turns = self.dialogue_set()
            self.judges.get()  # a missing or corrupt judge is refused now, not after the replies are generated
            options["dialogue_set"] = {"source": turns.source, "items_hash": turns.items_hash}
        instrument: Instrument
        self._store_instrument(request.inventory, turns)
        with transaction(self.sessions) as session:
            if turns is not None:
                dialogue.check_unseen(session, resolved, turns)
                record = dialogue.dialogue_record(session, turns)
                instrument = turns
            else:
                record = store.inventory_record(session, request.inventory)
                instrument = Inventory.model_validate(record.definition)
            assessment = store.create(
                session,
                persona=request.persona.model_dump(mode="json", exclude_none=True),
                resolved=resolved.report(),
                persona_key=resolved.key,
                method=str(request.persona.method),
                inventory=record,
                scoring=request.scoring,
                runs=request.runs,
                options=options,
                owner_key=owner_key,
            )
            assessment.progress = {"items_done": 0, "items": self._expected(instrument, request)}
            self._hold(assessment)
            return assessment.id, resolved, instrument

    def _store_instrument(self, inventory: str, turns: dialogue.DialogueSet | None) -> None:
        """Store a built-in inventory (or the dialogue set) on first use, in a transaction of its own.

        Two assessments of a fresh database may both find it missing and both insert it: the loser's
        insert fails on the unique name, and its second look finds the winner's row.
        """
        from sqlalchemy.exc import IntegrityError

        for attempt in range(2):
            try:
                with transaction(self.sessions) as session:
                    if turns is not None:
                        dialogue.dialogue_record(session, turns)
                    else:
                        store.inventory_record(session, inventory)
                return
            except IntegrityError:
                if attempt:
                    raise

    async def submit(self, request: AssessRequest, *, owner_key: str | None = None) -> str:
        """Prepare (in a thread), then run in the background on the current event loop.

        A caller cancelled while the thread prepares (the client went away) leaves nothing behind: the
        row it created is marked failed and the persona released once the thread is done.
        """
        prepared = asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.prepare, request, owner_key=owner_key)
        )
        try:
            assessment_id, resolved, inventory = await asyncio.shield(prepared)
        except asyncio.CancelledError:
            prepared.add_done_callback(self._abandon)
            raise
        self._start(assessment_id, self.run(assessment_id, request, resolved, inventory))
        return assessment_id

    def _abandon(self, prepared: asyncio.Future[tuple[str, ResolvedPersona, Instrument]]) -> None:
        """A prepared assessment nobody will run (its submitter was cancelled): fail it, release its persona."""
        if prepared.cancelled() or prepared.exception() is not None:
            return
        assessment_id, resolved, _ = prepared.result()
        self.resolver.release(resolved)
        error = "cancelled: the request that created it was cancelled"
        asyncio.get_running_loop().run_in_executor(None, self._fail, assessment_id, error)  # off the event loop

    async def run(
        self,
        assessment_id: str,
        request: AssessRequest,
        resolved: ResolvedPersona,
        inventory: Instrument,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Administer and store; the persona (held by :meth:`prepare`) is released when it ends, however it ends."""
        try:
            await self._run(assessment_id, request, resolved, inventory, on_progress)
        finally:
            self.resolver.release(resolved)

    async def _run(
        self,
        assessment_id: str,
        request: AssessRequest,
        resolved: ResolvedPersona,
        inventory: Instrument,
        on_progress: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        try:
            await asyncio.to_thread(self._in_transaction, store.mark_running, assessment_id, self._lease())
            lora = None
            if resolved.adapter_name is not None and resolved.adapter_path is not None:
                lora = await self.engine.register_lora(resolved.adapter_name, resolved.adapter_path)  # type: ignore[attr-defined]

            expected = self._expected(inventory, request)
            latest: dict[str, Any] = {"items_done": 0, "items": expected}
            writing = asyncio.Lock()  # a beat and a progress report never race (the newest wins)

            async def write(info: dict[str, Any]) -> bool:
                async with writing:
                    latest.update(info)
                    values = {"progress": dict(latest)}  # a new dict: later updates do not reach it
                    return await asyncio.to_thread(self._renew_now, assessment_id, values)

            async def progress(info: dict[str, Any]) -> None:
                await write(info)
                if on_progress is not None:
                    on_progress(info)

            stop = asyncio.Event()
            beating = asyncio.create_task(self._keep_beating(assessment_id, stop, write))
            try:
                if isinstance(inventory, dialogue.DialogueSet):
                    judge = await asyncio.to_thread(self.judges.get)
                    responses = await dialogue.administer_dialogue(
                        self.engine,
                        resolved,
                        inventory,
                        judge,
                        runs=request.runs,
                        max_items=request.max_items,
                        sampling=request.dialogue_sampling(),
                        seed=request.seed,
                        lora=lora,
                        progress=progress,
                    )
                    scores = dialogue.score_dialogue(responses, request.runs, judge, inventory)
                else:
                    responses = await administer(
                        self.engine, resolved, inventory, request, lora=lora, progress=progress
                    )
                    scores = score(
                        inventory,
                        responses,
                        request.runs,
                        min_coverage=request.min_coverage,
                        min_option_mass=request.min_option_mass,
                    )
            finally:
                stop.set()
                await beating  # a beat in flight lands before the final write, never after it
            await asyncio.to_thread(self._in_transaction, store.complete, assessment_id, responses, scores, expected)
            logger.info("Assessment %s done (%d responses)", assessment_id, len(responses))
        except asyncio.CancelledError:
            self._fail(assessment_id, "cancelled: the service shut down")
            raise
        except Exception as exc:
            logger.exception("Assessment %s failed", assessment_id)
            await self._fail_eventually(assessment_id, f"{type(exc).__name__}: {exc}")

    async def _keep_beating(
        self, assessment_id: str, stop: asyncio.Event, write: Callable[[dict[str, Any]], Awaitable[bool]]
    ) -> None:
        """Renew the lease while a run is in progress, so no sweep takes it for a dead one (until it is lost)."""

        async def beat() -> bool:
            held = await write({})
            if not held:  # its completion is refused too: a sweep's verdict (failed) is final
                logger.warning("Assessment %s: the lease was lost (swept as dead elsewhere)", assessment_id)
            return held

        await keep_beating(stop, self.heartbeat_seconds, beat, f"assessment {assessment_id}")

    def _mark_failed(self, assessment_id: str, error: str) -> None:
        self._in_transaction(store.fail, assessment_id, error)

    def _fail(self, assessment_id: str, error: str) -> None:
        try:
            self._mark_failed(assessment_id, error)
        except Exception:  # the database itself may be down; the sweep fails it once its lease expires
            logger.exception("could not mark assessment %s failed", assessment_id)

    async def _fail_eventually(self, assessment_id: str, error: str) -> None:
        """Mark the assessment failed, retrying (1, 2, 4 .. 30 s) while the database is down.

        Gives up after the lease's length, when the sweep at the next start takes over.
        """
        deadline = time.monotonic() + self.lease_seconds
        for delay in backoff_delays(1.0, 30.0):
            try:
                await asyncio.to_thread(self._mark_failed, assessment_id, error)
                return
            except Exception:
                if time.monotonic() + delay > deadline:
                    logger.exception("could not mark assessment %s failed; the next sweep will", assessment_id)
                    return
                logger.warning("could not mark assessment %s failed yet; retrying in %.0f s", assessment_id, delay)
                await asyncio.sleep(delay)
