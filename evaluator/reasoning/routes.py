"""HTTP routes of the reasoning evaluation; the service mounts them with its own dependencies.

POST /v1/reasoning (202), POST /v1/reasoning/{id}/cancel, GET /v1/reasoning[/{id}[/items]],
POST /v1/reasoning/compare. The runner is the service's (built by its lifespan, which drains it).
"""

# No ``from __future__ import annotations``: FastAPI resolves the Annotated aliases built inside build_router.
import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response, status
from sqlalchemy.orm import Session

from big5core.errors import Conflict
from big5core.models import ReasoningRun
from big5engine.errors import EngineNotReady
from evaluator.reasoning import report, store
from evaluator.reasoning.runner import CANCELLED_BY_CLIENT, ReasoningRunner
from evaluator.reasoning.schemas import (
    ReasoningAccepted,
    ReasoningCompareRequest,
    ReasoningItemOut,
    ReasoningRequest,
    ReasoningRunOut,
    UnitOut,
)
from evaluator.schemas import public_progress


class ReasoningRunFinished(Conflict):
    """The run is done or failed already: nothing to cancel."""

    code, title = "reasoning-run-finished", "The reasoning run has finished"


def run_out(run: ReasoningRun) -> ReasoningRunOut:
    return ReasoningRunOut(
        id=run.id,
        state=run.state,
        personas=list(run.personas),
        tasks=list(run.tasks),
        limit=run.item_limit,
        options=run.options,
        lm_eval_version=run.lm_eval_version,
        progress=public_progress(run.progress),
        error=run.error,
        results=[UnitOut.model_validate(r, from_attributes=True) for r in run.results],
        created_at=run.created_at,
        finished_at=run.finished_at,
    )


def build_router(
    get_runner: Callable[..., ReasoningRunner],
    get_session: Callable[..., Any],
    require_client: Callable[..., Any],
) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["reasoning"], dependencies=[Depends(require_client)])
    RunnerDep = Annotated[ReasoningRunner, Depends(get_runner)]
    SessionDep = Annotated[Session, Depends(get_session)]

    @router.post("/reasoning", status_code=status.HTTP_202_ACCEPTED, response_model=ReasoningAccepted)
    async def start(body: ReasoningRequest, runner: RunnerDep, response: Response) -> ReasoningAccepted:
        """Evaluate personas on reasoning tasks in the background; poll GET /v1/reasoning/{id}.

        Admitted like an assessment (503 server-busy beyond the service's limits, among them
        ``max_reasoning_runs`` runs at once); 503 engine-not-ready while the engine cannot run it."""
        if not runner.engine.ready:
            raise EngineNotReady(runner.engine.error or "the engine is starting")
        accepted = ReasoningAccepted.queued("/v1/reasoning", await runner.submit(body))
        response.headers["Location"] = accepted.links["self"]
        return accepted

    @router.post("/reasoning/{run_id}/cancel", response_model=ReasoningRunOut)
    async def cancel(run_id: str, runner: RunnerDep, session: SessionDep) -> ReasoningRunOut:
        """Stop a queued or running run: it ends failed ("cancelled by a client"), its stored units stay
        (``big5 reason --resume`` finishes it). Cancelling a cancelled run changes nothing; a run that
        finished otherwise is a 409. A run another replica runs stops at its next heartbeat."""
        store.get(session, run_id)  # 404 for an unknown run
        changed = await runner.cancel(run_id)
        session.expire_all()
        run = store.get(session, run_id)
        if not changed and run.error != CANCELLED_BY_CLIENT:
            raise ReasoningRunFinished(f"reasoning run {run_id} is {run.state} already; it cannot be cancelled")
        return run_out(run)

    @router.get("/reasoning/{run_id}", response_model=ReasoningRunOut)
    def get_run(run_id: str, session: SessionDep) -> ReasoningRunOut:
        return run_out(store.get(session, run_id))

    @router.get("/reasoning/{run_id}/items", response_model=list[ReasoningItemOut])
    def get_items(
        run_id: str,
        session: SessionDep,
        task: str | None = None,
        persona: Annotated[str | None, Query(description="canonical persona key")] = None,
    ) -> list[ReasoningItemOut]:
        return [ReasoningItemOut.of(r, i) for r, i in store.items(session, run_id, task=task, persona_key=persona)]

    @router.get("/reasoning", response_model=list[ReasoningRunOut])
    def list_runs(
        session: SessionDep,
        state: str | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[ReasoningRunOut]:
        return [run_out(r) for r in store.search(session, state=state, limit=limit, offset=offset)]

    @router.post(
        "/reasoning/compare",
        responses={200: {"content": {"image/svg+xml": {}, "image/png": {}, "application/json": {}}}},
    )
    async def compare(body: ReasoningCompareRequest, session: SessionDep) -> Any:
        """The paper's table: per task and trait, accuracy induced high and low, the paired difference with its
        95% bootstrap CI, Direct, and the mean over tasks; or its plot (svg, png)."""
        if body.runs:
            for run_id in body.runs:
                store.get(session, run_id)  # 404 for an unknown run
        units = store.unit_scores(session, body.runs)
        if body.methods:
            units = [u for u in units if u["method"] in body.methods or u["method"] == "direct"]
        table = await asyncio.to_thread(report.reasoning_table, units, body.tasks)
        if body.format == "json":
            return {**table.to_dict(), "text": table.format()}
        media = "image/svg+xml" if body.format == "svg" else "image/png"
        return Response(await asyncio.to_thread(report.table_figure, table, body.format), media_type=media)

    return router
