"""The FastAPI application: ``create_app(settings)`` builds it; nothing is created at import time.

Lifespan: build the stack unless given (migrates the database), start the engine in the background
unless given started (so /health answers "loading" at once and generation answers 503 + Retry-After
until it is ready), create the assessment runner and sweep assessments a crashed process left
behind. On the way out: cancel running assessments, shut down the engine if this app started it,
close the stack if this app built it. Everything lives on one typed :class:`ServiceState`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI

from big5core import registry
from big5core.engine import PersonaEngine
from big5core.models import AdapterState
from big5core.settings import Settings
from big5core.stack import Stack, build_stack
from evaluator.routes import build_router as build_evaluator_router
from service import errors
from service.deps import get_runner, get_session, require_admin, require_client
from service.metrics import ServiceMetrics
from service.middleware import (
    BodyLimitMiddleware,
    MetricsMiddleware,
    RequestContextMiddleware,
    install_request_id_logging,
)
from service.routes import adapters, generate, health, openai, training
from service.serving import GenerationService
from service.state import Admission, AdmittedRunner, ServiceState

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Chat in any Big Five personality: trained LoRA adapters (SFT/DPO), exact compositions of per-trait
adapters for trait vectors, or the prompting baselines, all served from one engine whose batches
mix personas. Errors are RFC 9457 problem details (`application/problem+json`).
"""


def _version() -> str:
    try:
        return version("big5chat")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def create_app(settings: Settings, *, stack: Stack | None = None, engine: PersonaEngine | None = None) -> FastAPI:
    """The service. ``stack``/``engine`` given: used as they are (a given started engine is not shut down)."""
    metrics = ServiceMetrics()
    install_request_id_logging()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await _start(settings, stack, engine, metrics)
        app.state.service = state
        try:
            yield
        finally:
            app.state.service = None
            await _stop(state)

    app = FastAPI(title="BIG5-CHAT", version=_version(), description=DESCRIPTION, lifespan=lifespan)
    errors.install(app)
    app.include_router(generate.router)
    app.include_router(openai.router)
    app.include_router(adapters.router)
    app.include_router(training.router)
    app.include_router(build_evaluator_router(get_runner, get_session, require_client, require_admin))
    app.include_router(health.router)
    # Added last = outermost: request id, then metrics, then the body limit next to the routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.service.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestContextMiddleware)
    return app


async def _start(
    settings: Settings, stack: Stack | None, engine: PersonaEngine | None, metrics: ServiceMetrics
) -> ServiceState:
    owns_stack = stack is None
    built = stack if stack is not None else await asyncio.to_thread(build_stack, settings)
    try:
        engine = engine if engine is not None else built.make_engine()
        admission = Admission(settings.service.max_queue, metrics)
        runner = AdmittedRunner(built.sessions, built.resolver, engine, admission=admission)
        swept = await asyncio.to_thread(runner.sweep)
        if swept:
            logger.warning("Marked %d interrupted assessment(s) failed", swept)
        state = ServiceState(
            settings=settings,
            stack=built,
            engine=engine,
            runner=runner,
            serving=GenerationService(settings.service, built.resolver, engine, admission, metrics),
            admission=admission,
            metrics=metrics,
            owns_stack=owns_stack,
            known_adapters=await asyncio.to_thread(_ready_refs, built),
        )
    except BaseException:
        if owns_stack:
            built.close()
        raise
    metrics.bind(built.resolver.stats, lambda: engine.ready, lambda: admission.in_flight)
    if not engine.ready and not engine.starting and engine.error is None:
        state.owns_engine = True
        state.engine_task = asyncio.create_task(_start_engine(engine), name="big5-engine-start")
    logger.info(
        "Service started: base model %s, engine %s, %d ready adapter(s)",
        built.base_model_id, state.health, len(state.known_adapters),
    )  # fmt: skip
    return state


async def _start_engine(engine: PersonaEngine) -> None:
    # A failure is recorded on the engine (engine.error) and logged there; /health reports it.
    with contextlib.suppress(Exception):
        await engine.astart()


async def _stop(state: ServiceState) -> None:
    await state.runner.drain()
    if state.engine_task is not None and not state.engine_task.done():
        state.engine_task.cancel()  # stops waiting; a start under way finishes and is then shut down
    if state.owns_engine:
        await asyncio.to_thread(state.engine.shutdown)
    if state.owns_stack:
        state.stack.close()
    logger.info("Service stopped")


def _ready_refs(stack: Stack) -> set[str]:
    with stack.sessions() as session:
        rows = registry.list_adapters(session, state=AdapterState.READY, base_model=stack.base_model_id)
        return {row.ref for row in rows}
