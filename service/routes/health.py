"""GET /health (engine state; no key) and GET /metrics (Prometheus text; a key while keys are set, unless
``metrics_public``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from big5core.errors import redact_paths
from big5engine.errors import EngineNotReady
from service.context import current_request_id
from service.deps import MaybeStateDep, StateDep, require_metrics_access
from service.errors import PROBLEM_MEDIA_TYPE, problem_body
from service.schemas import HealthOut, problems
from service.supervisor import EngineLost

router = APIRouter(tags=["operations"])


@router.get(
    "/health",
    response_model=HealthOut,
    responses={
        503: {
            **problems(503)[503],
            "description": "Not ready: engine-not-ready (loading, restarting) or engine-lost (error: the process is "
            "about to exit), with Retry-After; the HealthOut fields ride along, its status as `state`.",
        }
    },
)
def health(
    request: Request,
    state: MaybeStateDep,
    live: Annotated[
        bool, Query(description="A liveness probe: 200 while the engine loads or restarts; 503 only on error.")
    ] = False,
    ready: Annotated[
        bool, Query(description="Kept for probes configured with it: plain /health is the readiness probe.")
    ] = False,
) -> Response:
    """200 ``ready`` only when the engine takes requests; otherwise a 503 problem with Retry-After:
    ``engine-not-ready`` while it loads or restarts, ``engine-lost`` once it will not come back here.

    A readiness probe (and Compose's healthcheck) uses plain ``/health``; a liveness probe
    ``/health?live=true``, which fails only on ``error`` (and the process exits then anyway).
    """
    if state is None:  # the lifespan is still building the stack
        body = HealthOut(status="loading")
    else:
        status = state.health
        error = state.engine.error if status in ("error", "restarting") else None
        body = HealthOut(
            status=status,  # type: ignore[arg-type]
            error=redact_paths(error, (state.settings.data_dir,)) if error else None,  # no key needed: no paths
            base_model=state.stack.base_model_id,
            engine_start_seconds=getattr(state.engine, "start_seconds", None),
            engine_restarts=getattr(state.engine, "restarts", 0),
        )
    if body.status == "ready" or (live and body.status != "error"):
        return JSONResponse(body.model_dump(mode="json"), status_code=200)
    what = f"the engine is {body.status}" + (f": {body.error}" if body.error else "")
    exc = EngineLost(what) if body.status == "error" else EngineNotReady(what)
    hidden = (state.settings.data_dir,) if state is not None else ()
    kind, problem = problem_body(exc, request.url.path, current_request_id(), hidden)
    problem.update(body.model_dump(mode="json", exclude={"status"}), state=body.status)
    headers = {"Retry-After": str(kind.retry_after)} if kind.retry_after is not None else {}
    return JSONResponse(problem, status_code=kind.status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
    dependencies=[Depends(require_metrics_access)],
)
def metrics(state: StateDep) -> Response:
    """Prometheus metrics (they name adapter refs): any valid key while keys are set, unless metrics_public."""
    payload, media_type = state.metrics.render()
    return Response(payload, media_type=media_type)
