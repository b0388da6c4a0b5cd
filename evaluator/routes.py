"""HTTP routes of the evaluator. The service mounts them with its own dependencies.

POST /v1/assess, GET /v1/assessments[/{id}[/items]], POST /v1/assessments/compare,
GET/POST /v1/inventories.

Assessments are scoped to the key that created them: a client lists, reads and compares only its own
(another key's is a 404), an admin (or anyone, with authentication off) every one. The caller is what
the service's ``require_client`` returns (see :class:`Caller`).
"""

# No ``from __future__ import annotations`` here: the routes use the Annotated aliases defined inside
# build_router, which FastAPI can only resolve when annotations are evaluated at definition time.
from collections.abc import Callable
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Query, Response, status
from sqlalchemy.orm import Session

from big5core.errors import redact_paths
from big5core.models import Assessment, TraitScore
from evaluator import report, store
from evaluator.inventories import Inventory, InventoryError, load_csv_items
from evaluator.runner import AssessmentRunner
from evaluator.schemas import (
    AssessAccepted,
    AssessmentOut,
    AssessRequest,
    CompareRequest,
    InventoryOut,
    InventoryUpload,
    ItemResponseOut,
    TraitScoreOut,
    public_progress,
)


class Caller(Protocol):
    """The authenticated caller, as the service's key check describes it."""

    @property
    def key_id(self) -> str | None: ...  # a non-secret id of its key; None when authentication is off

    @property
    def is_admin(self) -> bool: ...


def owner_scope(caller: Caller) -> str | None:
    """Whose assessments ``caller`` sees: its own key's, or (None) every one for an admin."""
    return None if caller.is_admin else caller.key_id


def assessment_out(a: Assessment) -> AssessmentOut:
    def out(s: TraitScore) -> TraitScoreOut:
        return TraitScoreOut(
            mean=s.mean,
            sd=s.sd,
            n_runs=s.n_runs,
            coverage=s.coverage,
            n_answered=s.n_answered,
            n_asked=s.n_asked,
            z=s.z,
        )

    traits = {s.key: out(s) for s in a.scores if s.scope == "trait"}
    facets = {s.key: out(s) for s in a.scores if s.scope == "facet"}
    return AssessmentOut(
        id=a.id,
        state=a.state,
        persona=a.persona,
        resolved_persona=a.resolved_persona,
        method=a.method,
        inventory=a.inventory.name,
        scoring=a.scoring_mode,
        runs=a.runs,
        options=a.options,
        progress=public_progress(a.progress),
        error=redact_paths(a.error) if a.error else None,  # the message of an exception: no server paths
        traits=traits,
        facets=facets,
        summary=a.summary or {},
        created_at=a.created_at,
        finished_at=a.finished_at,
    )


def build_router(
    get_runner: Callable[..., AssessmentRunner],
    get_session: Callable[..., Any],
    require_client: Callable[..., Any],
    require_admin: Callable[..., Any],
) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["assessment"], dependencies=[Depends(require_client)])
    RunnerDep = Annotated[AssessmentRunner, Depends(get_runner)]
    SessionDep = Annotated[Session, Depends(get_session)]
    CallerDep = Annotated[Caller, Depends(require_client)]  # the router's own check, run once per request

    @router.post("/assess", status_code=status.HTTP_202_ACCEPTED, response_model=AssessAccepted)
    async def assess(body: AssessRequest, runner: RunnerDep, caller: CallerDep, response: Response) -> AssessAccepted:
        """Start an assessment in the background; poll GET /v1/assessments/{id} (with the same key)."""
        accepted = AssessAccepted.queued("/v1/assessments", await runner.submit(body, owner_key=caller.key_id))
        response.headers["Location"] = accepted.links["self"]
        return accepted

    @router.get("/assessments/{assessment_id}", response_model=AssessmentOut)
    def get_assessment(assessment_id: str, session: SessionDep, caller: CallerDep) -> AssessmentOut:
        return assessment_out(store.get(session, assessment_id, owner_key=owner_scope(caller)))

    @router.get("/assessments/{assessment_id}/items", response_model=list[ItemResponseOut])
    def get_items(assessment_id: str, session: SessionDep, caller: CallerDep) -> list[ItemResponseOut]:
        found = store.responses(session, assessment_id, owner_key=owner_scope(caller))
        return [ItemResponseOut.model_validate(r, from_attributes=True) for r in found]

    @router.get("/assessments", response_model=list[AssessmentOut])
    def list_assessments(
        session: SessionDep,
        caller: CallerDep,
        persona: Annotated[str | None, Query(description="canonical persona key, e.g. big5/sft?openness=1")] = None,
        method: str | None = None,
        inventory: str | None = None,
        state: str | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[AssessmentOut]:
        found = store.search(
            session,
            persona_key=persona,
            method=method,
            inventory=inventory,
            state=state,
            limit=limit,
            offset=offset,
            owner_key=owner_scope(caller),
        )
        return [assessment_out(a) for a in found]

    @router.post(
        "/assessments/compare",
        responses={200: {"content": {"image/svg+xml": {}, "image/png": {}, "application/json": {}}}},
    )
    def compare(body: CompareRequest, session: SessionDep, caller: CallerDep) -> Any:
        """The paper's table: per comparable group (method, adapter and version, layout, scoring mode, runs,
        base model) and trait, the induced trait's score when induced high and low, with n per cell, and
        alpha and omega across the group's personas x runs. 400 when base models would mix (unless asked).
        A client's table holds only its own key's assessments."""
        found = list(
            store.search(session, inventory=body.inventory, state="done", limit=100_000, owner_key=owner_scope(caller))
        )
        if body.methods:
            found = [a for a in found if a.method in body.methods or a.method == "direct"]
        if body.scoring:
            found = [a for a in found if a.scoring_mode == body.scoring]
        if body.base_model:
            found = [a for a in found if report.group_key(a).base_model == body.base_model]
        report.check_base_models(found, allow_mixed=body.mix_base_models)
        reliability = None
        if body.reliability and found:
            grouped = report.groups(found)
            values = store.run_values(session, [a.id for a in found])
            inventory = store.load_inventory(session, body.inventory)
            reliability = report.group_reliability(grouped, values, inventory)
        table = report.paper_table(found, body.inventory, reliability)
        if body.format == "json":
            return {**table.to_dict(), "text": table.format()}
        media = "image/svg+xml" if body.format == "svg" else "image/png"
        return Response(report.table_figure(table, body.format), media_type=media)

    @router.get("/inventories", response_model=list[InventoryOut])
    def list_inventories(session: SessionDep) -> list[InventoryOut]:
        return [_inventory_out(inv, builtin) for inv, builtin in store.list_inventories(session)]

    @router.get("/inventories/{name}")
    def get_inventory(name: str, session: SessionDep) -> dict[str, Any]:
        return store.load_inventory(session, name).model_dump(mode="json")

    @router.post(
        "/inventories",
        status_code=status.HTTP_201_CREATED,
        response_model=InventoryOut,
        dependencies=[Depends(require_admin)],
    )
    def upload_inventory(body: InventoryUpload, session: SessionDep) -> InventoryOut:
        """Add a custom inventory (validated: traits, keys, unique ids, non-empty)."""
        if (body.items is None) == (body.items_csv is None):
            raise InventoryError("give exactly one of items or items_csv")
        items = body.items if body.items is not None else load_csv_items(body.items_csv or "")
        inventory = Inventory.model_validate(
            {
                **body.model_dump(exclude={"items", "items_csv"}),
                "items": [i.model_dump() for i in items],
            }
        )
        store.add_inventory(session, inventory)
        session.commit()
        return _inventory_out(inventory, False)

    return router


def _inventory_out(inventory: Inventory, builtin: bool) -> InventoryOut:
    return InventoryOut(
        name=inventory.name,
        title=inventory.title,
        citation=inventory.citation,
        licence=inventory.licence,
        builtin=builtin,
        n_items=len(inventory.items),
        scale=inventory.scale.model_dump(mode="json"),
    )
