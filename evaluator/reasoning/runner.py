"""Runs of personas x tasks: validate and resolve up front, evaluate concurrently, store unit by unit.

Every (persona, task) unit is written whole (its result and all its items) in ONE transaction, so a
unit is either absent or complete; the run is marked done only when every unit is stored. A run that
fails or is killed midway keeps its stored units: :meth:`ReasoningRunner.run` on it again evaluates
only the missing ones (``big5 reason --resume ID``), and the service's sweep fails runs whose lease
expired (their process stopped). Units run on a thread pool (lm-eval is synchronous), all on ONE engine: their
requests meet in its batches (multi-LoRA), and the units of a task are scheduled together.

A run is cancelled (:meth:`ReasoningRunner.cancel`, or the service's shutdown) by cancelling its task:
the engine calls its units have in flight are cancelled too (which aborts them in the engine), no
further unit starts, and it ends failed. A run cancelled or swept by another replica (its lease
no longer held) is noticed at the next heartbeat. Composed adapters are held from the run's start to its end.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from big5core import lease
from big5core.db import transaction
from big5core.heartbeat import keep_beating
from big5core.models import ReasoningRun, ReasoningState
from big5core.settings import ReasoningSettings
from big5engine.engine import PersonaEngine
from big5personas.resolver import PersonaResolver, ResolvedPersona
from big5personas.spec import PersonaSpec
from evaluator.background import HEARTBEAT_SECONDS, LEASE_SECONDS, BackgroundRunner
from evaluator.reasoning import store
from evaluator.reasoning.errors import ReasoningRunNotResumable
from evaluator.reasoning.schemas import ReasoningRequest
from evaluator.reasoning.tasks import TaskInfo, resolve_tasks, task_info

if TYPE_CHECKING:
    from evaluator.reasoning.harness import UnitResult
    from evaluator.reasoning.lm import Big5LM

logger = logging.getLogger(__name__)


Evaluate = Callable[..., "UnitResult"]
T = TypeVar("T")
CANCELLED_BY_CLIENT = "cancelled by a client"


class ReasoningRunner(BackgroundRunner):
    model = ReasoningRun
    live = (ReasoningState.QUEUED, ReasoningState.RUNNING)
    failed = ReasoningState.FAILED

    def __init__(
        self,
        sessions: sessionmaker[Session],
        resolver: PersonaResolver,
        engine: PersonaEngine,
        settings: ReasoningSettings,
        *,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        lease_seconds: int | float = LEASE_SECONDS,
        evaluate: Evaluate | None = None,
    ) -> None:
        super().__init__(sessions, heartbeat_seconds, lease_seconds)
        self.resolver = resolver
        self.engine = engine
        self.settings = settings
        if evaluate is None:
            from evaluator.reasoning.harness import evaluate_unit as evaluate
        self.evaluate = evaluate
        self._progress_lock = threading.Lock()

    # ------------------------------------------------------------ create

    def prepare(self, request: ReasoningRequest) -> str:
        """Validate the tasks, resolve every persona (raising domain errors) and create the queued run."""
        tasks = resolve_tasks(request.tasks, self.settings)
        keys: list[str] = []
        reports: dict[str, Any] = {}
        for spec in request.specs():
            with self.resolver.holding(spec) as resolved:  # checked now; the run resolves (and holds) again
                if resolved.key not in reports:
                    keys.append(resolved.key)
                    reports[resolved.key] = resolved.report()
        options = {
            "apply_chat_template": request.apply_chat_template,
            "max_gen_toks": request.max_gen_toks or self.settings.max_gen_toks,
            "source": self.settings.source,
            "resolved": reports,
        }
        with transaction(self.sessions) as session:
            run = store.create(
                session,
                personas=keys,
                tasks=[t.name for t in tasks],
                limit=request.limit,
                options=options,
                lm_eval_version=version("lm_eval"),
                progress={"units_done": 0, "units": len(keys) * len(tasks)},
            )
            self._hold(run)
            return run.id

    async def submit(self, request: ReasoningRequest) -> str:
        """Prepare (in a thread), then run in the background on the current event loop.

        A caller cancelled while the thread prepares leaves no queued run behind: it is marked failed.
        """
        loop = asyncio.get_running_loop()
        prepared = loop.run_in_executor(None, self.prepare, request)
        try:
            run_id = await asyncio.shield(prepared)
        except asyncio.CancelledError:
            prepared.add_done_callback(self._abandon)
            raise
        self._start(run_id, self.run(run_id))
        return run_id

    def _abandon(self, prepared: asyncio.Future[str]) -> None:
        if not prepared.cancelled() and prepared.exception() is None:
            reason = "cancelled: the request that created it was cancelled"
            asyncio.get_running_loop().run_in_executor(None, self._fail, prepared.result(), reason)

    # ------------------------------------------------------------ cancel

    async def cancel(self, run_id: str, reason: str = CANCELLED_BY_CLIENT) -> bool:
        """Mark the run failed with ``reason`` (if queued or running) and stop it if it runs here.

        True when the row changed. A run another process runs stops at that runner's next heartbeat.
        """
        changed = await asyncio.to_thread(self._mark_failed, run_id, reason)
        task = self._by_id.get(run_id)
        if task is not None:
            task.cancel()
        return changed

    def _mark_failed(self, run_id: str, reason: str) -> bool:
        with transaction(self.sessions) as session:
            return store.fail(session, run_id, reason)

    # ------------------------------------------------------------ run

    async def run(self, run_id: str, on_unit: Callable[[UnitResult], None] | None = None) -> str:
        """Evaluate the run's missing units and mark it done, or failed with the reason; returns the state."""
        try:
            return await self._run(run_id, on_unit)
        except asyncio.CancelledError:
            self._fail(run_id, "cancelled: the process running it stopped")
            raise
        except Exception as exc:
            logger.exception("Reasoning run %s failed", run_id)
            self._fail(run_id, f"{type(exc).__name__}: {exc}")
            return ReasoningState.FAILED

    async def _run(self, run_id: str, on_unit: Callable[[UnitResult], None] | None) -> str:
        engine = _RunEngine(self.engine)
        held: list[ResolvedPersona] = []
        try:
            return await self._evaluate(run_id, on_unit, engine, held)
        except asyncio.CancelledError:
            engine.cancel()  # the units' engine calls in flight end now; their threads then finish
            raise
        finally:
            for resolved in held:
                self.resolver.release(resolved)

    async def _evaluate(
        self,
        run_id: str,
        on_unit: Callable[[UnitResult], None] | None,
        engine: _RunEngine,
        held: list[ResolvedPersona],
    ) -> str:
        with self.sessions() as session:
            run = store.get(session, run_id)
            keys, names, limit, options = list(run.personas), list(run.tasks), run.item_limit, dict(run.options)
            done = store.stored_units(session, run_id)
        tasks = [task_info(n) for n in names]
        todo = [(t, k) for t in tasks for k in keys if (t.name, k) not in done]  # task-major: a task's units together
        progress: dict[str, Any] = {"units_done": len(done), "units": len(keys) * len(tasks)}
        await asyncio.to_thread(self._in_transaction, store.mark_running, run_id, dict(progress), self._lease())
        models = await self._models(keys, engine, held)
        stop = asyncio.Event()
        current = asyncio.current_task()
        assert current is not None
        beating = asyncio.create_task(self._keep_beating(run_id, progress, stop, current))
        pool = ThreadPoolExecutor(
            max_workers=max(1, min(self.settings.concurrency, len(todo))), thread_name_prefix="reason"
        )
        loop = asyncio.get_running_loop()
        try:
            jobs = [
                loop.run_in_executor(pool, self._unit, run_id, models[key], info, limit, options, progress, on_unit)
                for info, key in todo
            ]
            try:
                outcomes = await asyncio.gather(*jobs, return_exceptions=True)
            except asyncio.CancelledError:
                engine.cancel()
                raise
        finally:
            stop.set()
            await beating
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)  # never on the event loop
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            first = errors[0]
            raise RuntimeError(f"{len(errors)} of {len(todo)} unit(s) failed; first: {type(first).__name__}: {first}")
        with transaction(self.sessions) as session:
            finished = store.complete(session, run_id, len(keys) * len(tasks))
        if not finished:
            raise RuntimeError("not every unit is stored, or the run is no longer running")
        logger.info("Reasoning run %s done (%d units evaluated now)", run_id, len(todo))
        return ReasoningState.DONE

    async def _models(self, keys: list[str], engine: _RunEngine, held: list[ResolvedPersona]) -> dict[str, Big5LM]:
        """One lm-eval model per persona on ``engine``; each resolved persona is appended to ``held``."""
        from evaluator.reasoning.lm import Big5LM

        models: dict[str, Big5LM] = {}
        for key in keys:
            resolved = await self.resolver.aresolve(PersonaSpec.from_model_name(key))
            held.append(resolved)
            lora = None
            if resolved.adapter_name is not None and resolved.adapter_path is not None:
                lora = await self.engine.register_lora(resolved.adapter_name, resolved.adapter_path)
            models[key] = Big5LM(engine=cast(PersonaEngine, engine), resolved=resolved, lora=lora)
        return models

    def _unit(
        self,
        run_id: str,
        lm: Big5LM,
        info: TaskInfo,
        limit: int | None,
        options: dict[str, Any],
        progress: dict[str, Any],
        on_unit: Callable[[UnitResult], None] | None,
    ) -> None:
        unit = self.evaluate(
            lm,
            info,
            self.settings,
            limit=limit,
            apply_chat_template=bool(options.get("apply_chat_template")),
            max_gen_toks=options.get("max_gen_toks"),
        )
        with self._progress_lock:
            progress["units_done"] += 1
            values = {"progress": dict(progress)}
        with transaction(self.sessions) as session:  # the unit, all its items and the progress: one transaction
            store.add_unit(session, run_id, unit)
            self._renew(session, run_id, values)  # a run cancelled meanwhile keeps the unit (a resume skips it)
        if on_unit is not None:
            on_unit(unit)

    # ------------------------------------------------------------ liveness

    async def _keep_beating(
        self, run_id: str, progress: dict[str, Any], stop: asyncio.Event, run: asyncio.Task[Any]
    ) -> None:
        """Renew the lease; stop the run (cancel ``run``) once this runner no longer holds it live."""

        async def beat() -> bool:
            with self._progress_lock:
                values = {"progress": dict(progress)}
            if await asyncio.to_thread(self._renew_now, run_id, values):
                return True
            state = await asyncio.to_thread(self._state, run_id)
            logger.info("Reasoning run %s is %s (cancelled or swept elsewhere): stopping it", run_id, state)
            run.cancel()
            return False

        await keep_beating(stop, self.heartbeat_seconds, beat, f"reasoning run {run_id}")

    def _state(self, run_id: str) -> str | None:
        with self.sessions() as session:
            return session.scalar(select(ReasoningRun.state).where(ReasoningRun.id == run_id))

    def _fail(self, run_id: str, error: str) -> None:
        try:
            self._in_transaction(store.fail, run_id, error)
        except Exception:  # the database may be down: the sweep fails it once its lease expires
            logger.exception("could not mark reasoning run %s failed", run_id)

    def check_resumable(self, run_id: str) -> None:
        """Raise unless the run may be resumed here: failed, or queued/running under an expired lease."""
        with self.sessions() as session:
            run = store.get(session, run_id)
            if run.state == ReasoningState.DONE:
                raise ReasoningRunNotResumable(f"reasoning run {run_id} is done")
            if run.state != ReasoningState.FAILED and not lease.is_expired(session, ReasoningRun, run_id):
                raise ReasoningRunNotResumable(f"reasoning run {run_id} is {run.state} under a live process")


class _RunEngine:
    """The engine as one run's units see it: every call it has in flight can be cancelled with the run.

    The units run lm-eval in worker threads, each engine call on an event loop of its thread;
    :meth:`cancel` cancels those calls on their loops (the engine aborts their requests), and every
    later call raises ``CancelledError`` at once. Anything else is the engine's own attribute.
    """

    def __init__(self, engine: PersonaEngine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._calls: set[tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = set()
        self._cancelled = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            calls = list(self._calls)
        for loop, task in calls:
            loop.call_soon_threadsafe(task.cancel)

    async def _guarded(self, call: Coroutine[Any, Any, T]) -> T:
        task = asyncio.current_task()
        entry = (asyncio.get_running_loop(), task)
        with self._lock:
            cancelled = self._cancelled
            if not cancelled and task is not None:
                self._calls.add(entry)  # type: ignore[arg-type]
        if cancelled:
            call.close()
            raise asyncio.CancelledError("the reasoning run was cancelled")
        try:
            return await call
        finally:
            with self._lock:
                self._calls.discard(entry)  # type: ignore[arg-type]

    async def next_token_logprobs(self, *args: Any, **kwargs: Any) -> Any:
        return await self._guarded(self._engine.next_token_logprobs(*args, **kwargs))

    async def continuation_logprobs(self, *args: Any, **kwargs: Any) -> Any:
        return await self._guarded(self._engine.continuation_logprobs(*args, **kwargs))

    async def generate_ids(self, *args: Any, **kwargs: Any) -> Any:
        return await self._guarded(self._engine.generate_ids(*args, **kwargs))

    async def generate(self, *args: Any, **kwargs: Any) -> Any:
        return await self._guarded(self._engine.generate(*args, **kwargs))
