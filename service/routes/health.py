"""GET /health (engine state) and GET /metrics (Prometheus text format). Neither needs a key."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.deps import MaybeStateDep, StateDep
from service.schemas import HealthOut

router = APIRouter(tags=["operations"])


@router.get(
    "/health",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "The engine failed; the body says why."}},
)
def health(state: MaybeStateDep) -> Response:
    """``loading`` (200) while the engine starts, ``ready`` (200), or ``error`` (503) with the reason."""
    if state is None:  # the lifespan is still building the stack
        body = HealthOut(status="loading")
    else:
        status = state.health
        body = HealthOut(
            status=status,  # type: ignore[arg-type]
            error=state.engine.error if status == "error" else None,
            base_model=state.stack.base_model_id,
            engine_start_seconds=getattr(state.engine, "start_seconds", None),
        )
    return JSONResponse(body.model_dump(mode="json"), status_code=503 if body.status == "error" else 200)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(state: StateDep) -> Response:
    payload, media_type = state.metrics.render()
    return Response(payload, media_type=media_type)
