"""The FastAPI application: ``create_app(settings)`` builds it; nothing is created at import time.

Lifespan: build the stack unless given (migrates the database), build and start the engine in the
background unless given (so /health answers 503 "loading" at once and generation answers 503 +
Retry-After until it is ready), supervise it (a dead engine core is restarted in-process with backoff;
after ``engine_restarts`` failures in a row, or more than ``engine_window_restarts`` within
``engine_restart_window_s``, ``on_engine_lost`` runs: see :mod:`service.supervisor`), create the
assessment and reasoning runners and sweep the runs a crashed process left behind. On the way out:
cancel running assessments and reasoning runs, shut down the engine if this app started it, close the
stack if this app built it. Everything lives on one typed :class:`ServiceState`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from big5core.models import AdapterState
from big5core.settings import Settings
from big5engine.engine import PersonaEngine
from big5engine.errors import EngineNotReady
from big5personas import registry
from big5personas.stack import Stack, build_stack
from evaluator.reasoning import routes as reasoning_routes
from evaluator.reasoning.runner import ReasoningRunner
from evaluator.routes import build_router as build_evaluator_router
from evaluator.runner import AssessmentRunner
from service import errors
from service.admission import Admission, Admitted
from service.deps import StateDep, get_session, get_state, require_admin, require_client
from service.metrics import ServiceMetrics
from service.middleware import (
    BodyLimitMiddleware,
    MetricsMiddleware,
    RequestContextMiddleware,
    install_request_id_logging,
)
from service.routes import adapters, datagen, generate, health, openai, training
from service.schemas import ChatCompletionChunk, GenerateStreamEvent, Problem, problems
from service.serving import GenerationService
from service.state import ServiceState
from service.supervisor import EngineSupervisor

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


# The evaluator's routers reach their runners through these (wiring: only this composition root names
# the evaluator's types).
def get_runner(state: StateDep) -> Admitted[AssessmentRunner]:
    """The assessment runner; 503 while the engine cannot run assessments."""
    if not state.engine.ready:
        raise EngineNotReady(state.engine.error or "the engine is starting")
    return state.runner


def get_reasoning_runner(state: StateDep) -> Admitted[ReasoningRunner]:
    """The reasoning runner built by the lifespan (its routes check the engine where they need it)."""
    return state.reasoning


def create_app(
    settings: Settings,
    *,
    stack: Stack | None = None,
    engine: PersonaEngine | None = None,
    on_engine_lost: Callable[[str], None] | None = None,
) -> FastAPI:
    """The service. ``stack``/``engine`` given: used as they are (a given engine is neither started nor shut
    down here, but it is restarted when its core dies). ``on_engine_lost(reason)`` runs when the engine
    cannot be (re)started any more (``big5 serve`` then exits non-zero); either way /health turns 503."""
    metrics = ServiceMetrics()
    install_request_id_logging()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await _start(settings, stack, engine, metrics, on_engine_lost)
        app.state.service = state
        try:
            yield
        finally:
            app.state.service = None
            await _stop(state)

    app = FastAPI(title="BIG5-CHAT", version=_version(), description=DESCRIPTION, lifespan=lifespan)
    errors.install(app, private_paths=(settings.data_dir,))  # absolute paths are always kept out of details
    app.include_router(generate.router)
    app.include_router(openai.router)
    app.include_router(adapters.router)
    app.include_router(training.router)
    app.include_router(datagen.router)  # issue 16
    # The evaluator's routes raise its and the resolver's domain errors (unknown inventory or
    # assessment, invalid or unrealisable persona, adapter not ready): the table maps them to these.
    app.include_router(
        build_evaluator_router(get_runner, get_session, require_client, require_admin),
        responses=problems(400, 404, 409),
    )
    reasoning = reasoning_routes.build_router(get_reasoning_runner, get_session, require_client)  # issue 14
    app.include_router(reasoning, responses=problems(400, 404, 409, 503))
    app.include_router(health.router)
    _add_aliases(app, UNVERSIONED_ALIASES)
    app.openapi = _openapi_documenting_problems(app)  # type: ignore[method-assign]
    # Added last = outermost: request id, then metrics, then the body limit next to the routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.service.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestContextMiddleware)
    return app


async def _start(
    settings: Settings,
    stack: Stack | None,
    engine: PersonaEngine | None,
    metrics: ServiceMetrics,
    on_engine_lost: Callable[[str], None] | None,
) -> ServiceState:
    owns_stack, owns_engine = stack is None, engine is None
    built = stack if stack is not None else await asyncio.to_thread(build_stack, settings)
    try:
        engine = engine if engine is not None else built.make_engine()
        admission = Admission(settings.service.max_queue, metrics)
        assessments = AssessmentRunner(built.sessions, built.resolver, engine)
        swept = await asyncio.to_thread(assessments.sweep)
        if swept:
            logger.warning("Marked %d interrupted assessment(s) failed", swept)
        runner = Admitted(assessments, admission)
        reasoning_runs = ReasoningRunner(built.sessions, built.resolver, engine, settings.reasoning)
        reasoning = Admitted(
            reasoning_runs,
            admission,
            runs=Admission(
                settings.service.max_reasoning_runs, metrics, what="reasoning runs", reason="reasoning_runs_full"
            ),
        )
        swept = await asyncio.to_thread(reasoning_runs.sweep)  # their stored units stay (resumable)
        if swept:
            logger.warning("Marked %d interrupted reasoning run(s) failed", swept)
        state = ServiceState(
            settings=settings,
            stack=built,
            engine=engine,
            runner=runner,
            reasoning=reasoning,
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
    state.owns_engine = owns_engine
    service = settings.service
    state.supervisor = EngineSupervisor(
        engine,
        restarts=service.engine_restarts,
        backoff_s=service.engine_restart_backoff_s,
        on_give_up=on_engine_lost,
        window_restarts=service.engine_window_restarts,
        window_s=service.engine_restart_window_s,
    )
    state.engine_task = asyncio.create_task(
        state.supervisor.run(start=state.owns_engine), name="big5-engine-supervisor"
    )
    logger.info(
        "Service started: base model %s, engine %s, %d ready adapter(s)",
        built.base_model_id, state.health, len(state.known_adapters),
    )  # fmt: skip
    return state


async def _stop(state: ServiceState) -> None:
    await asyncio.gather(state.runner.drain(), state.reasoning.drain())  # each run ends failed, adapters released
    if state.engine_task is not None and not state.engine_task.done():
        state.engine_task.cancel()  # stops supervising; a (re)start under way finishes and is then shut down
    if state.owns_engine:
        await asyncio.to_thread(state.engine.shutdown)
    if state.owns_stack:
        state.stack.close()
    logger.info("Service stopped")


UNVERSIONED_ALIASES = {"/v1/generate": "/generate", "/v1/assess": "/assess"}
"""The design's names for its internal clients: stable aliases, served (and documented) like the v1 routes."""


def _add_aliases(app: FastAPI, aliases: dict[str, str]) -> None:
    """Serve each ``aliases`` path's route also at its alias: the same endpoint, dependencies and schema."""
    for route in list(app.router.routes):
        if not isinstance(route, APIRoute) or route.path not in aliases:
            continue
        app.router.add_api_route(
            aliases[route.path],
            route.endpoint,
            methods=sorted(route.methods),
            name=f"{route.name}_alias",
            summary=f"{route.summary or route.name.replace('_', ' ').capitalize()} (alias of {route.path})",
            description=route.description,
            response_model=route.response_model,
            status_code=route.status_code,
            tags=route.tags,
            dependencies=route.dependencies,
            responses=route.responses,
            response_class=route.response_class,
            openapi_extra=route.openapi_extra,
        )


def _ready_refs(stack: Stack) -> set[str]:
    with stack.sessions() as session:
        rows = registry.list_adapters(session, state=AdapterState.READY, base_model=stack.base_model_id)
        return {row.ref for row in rows}


# ---------------------------------------------------------------- the OpenAPI schema


STREAMED_MODELS = (Problem, GenerateStreamEvent, ChatCompletionChunk)  # the event-stream docs refer to these
PROBLEM_CONTENT = {errors.PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
_FASTAPI_422 = "#/components/schemas/HTTPValidationError"


def _depends_on(dependant: Dependant, target: Callable[..., Any]) -> bool:
    return any(sub.call is target or _depends_on(sub, target) for sub in dependant.dependencies)


def _openapi_documenting_problems(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` that documents what the error handlers and middleware really answer.

    Every error response is a Problem as ``application/problem+json`` (FastAPI documents its own 422
    model and ``application/json``), and each operation lists the statuses it gets by construction:
    401 with a key dependency, 403 with the admin one, 503 when it needs the service state (while
    the service starts, and while the database is unavailable), 422 with parameters or a body, and
    400 (unparseable) and 413 (too large) with a body. Route-specific statuses stay with the routes.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        routes = {
            (route.path_format, method.lower()): route.dependant
            for route in app.routes
            if isinstance(route, APIRoute) and route.include_in_schema
            for method in route.methods
        }
        for path, item in schema.get("paths", {}).items():
            for method, operation in item.items():
                dependant = routes.get((path, method))
                responses = operation.setdefault("responses", {})
                added = []
                if operation.get("security"):
                    added.append("401")
                if dependant is not None and _depends_on(dependant, require_admin):
                    added.append("403")
                if dependant is not None and _depends_on(dependant, get_state):
                    added.append("503")
                if operation.get("parameters") or operation.get("requestBody"):
                    added.append("422")
                if operation.get("requestBody"):
                    added += ["400", "413"]
                for status in added:
                    responses.setdefault(status, {"description": "Problem details"})
                for status, response in responses.items():
                    content = response.get("content") or {}
                    json_ref = (content.get("application/json") or {}).get("schema", {}).get("$ref")
                    if (
                        status.isdigit()
                        and int(status) >= 400
                        and (not content or errors.PROBLEM_MEDIA_TYPE in content or json_ref == _FASTAPI_422)
                    ):
                        response["content"] = PROBLEM_CONTENT
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        _, streamed = models_json_schema(
            [(model, "serialization") for model in STREAMED_MODELS], ref_template="#/components/schemas/{model}"
        )
        for name, definition in streamed.get("$defs", {}).items():
            components.setdefault(name, definition)
        for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 models, replaced above
            components.pop(unused, None)
        return schema

    return openapi
