"""GET /health (engine state) and GET /metrics (Prometheus text format). Neither needs a key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from service.deps import MaybeStateDep, StateDep
from service.schemas import HealthOut

router = APIRouter(tags=["operations"])


@router.get(
    "/health",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "The engine failed (or, with ready=true, is not ready)."}},
)
def health(
    state: MaybeStateDep,
    ready: Annotated[bool, Query(description="Answer 503 unless the engine is ready (a readiness probe).")] = False,
) -> Response:
    """``loading`` or ``restarting`` (200), ``ready`` (200), or ``error`` (503) with the reason.

    As a liveness probe, plain ``/health`` fails only when the engine will not come back; as a
    readiness probe, ``/health?ready=true`` fails whenever the engine cannot take requests.
    """
    if state is None:  # the lifespan is still building the stack
        body = HealthOut(status="loading")
    else:
        status = state.health
        body = HealthOut(
            status=status,  # type: ignore[arg-type]
            error=state.engine.error if status in ("error", "restarting") else None,
            base_model=state.stack.base_model_id,
            engine_start_seconds=getattr(state.engine, "start_seconds", None),
            engine_restarts=getattr(state.engine, "restarts", 0),
        )
    failed = body.status == "error" or (ready and body.status != "ready")
    return JSONResponse(body.model_dump(mode="json"), status_code=503 if failed else 200)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(state: StateDep) -> Response:
    payload, media_type = state.metrics.render()
    return Response(payload, media_type=media_type)
