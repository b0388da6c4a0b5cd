"""The adapter registry as clients see it (never file paths), and the admin's reload.

The resolver reads the registry on every request, so an adapter published after start-up is served
without a restart. ``POST /v1/adapters/reload`` makes that explicit: it re-reads the registry,
verifies the sha256 of adapters it has not seen before (so a bad copy is reported now rather than
at its first request), and unloads from the engine adapters that are no longer ready.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from big5core.errors import redact_paths
from big5core.models import AdapterState
from big5personas import registry
from service.deps import AdminDep, SessionDep, StateDep, require_client
from service.schemas import AdapterOut, ReloadFailure, ReloadReport, problems
from service.state import ServiceState

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


@router.get("", response_model=list[AdapterOut], dependencies=[Depends(require_client)])
def list_adapters(
    session: SessionDep,
    state: Annotated[AdapterState | None, Query(description="Only adapters in this state.")] = None,
    method: Annotated[str | None, Query(description="sft or dpo.")] = None,
    base_model: Annotated[str | None, Query(description="Only adapters trained on this base model.")] = None,
) -> list[AdapterOut]:
    rows = registry.list_adapters(session, state=state.value if state else None, base_model=base_model)
    return [AdapterOut.model_validate(row, from_attributes=True) for row in rows if method in (None, row.method)]


@router.get("/{ref}", response_model=AdapterOut, dependencies=[Depends(require_client)], responses=problems(400, 404))
def get_adapter(ref: str, session: SessionDep) -> AdapterOut:
    """One adapter by ``name@version`` (or ``name``: its newest ready version)."""
    return AdapterOut.model_validate(registry.get(session, ref, ready=False), from_attributes=True)


@router.post("/reload", response_model=ReloadReport, responses=problems(401, 403))
async def reload_adapters(state: StateDep, _: AdminDep) -> ReloadReport:
    """Re-read the registry; verify new adapters; unload adapters that are no longer ready."""
    async with state.reload_lock:
        report, ready = await asyncio.to_thread(_scan, state)
        for name in sorted(state.engine.loras if state.engine.ready else ()):
            if "@" in name and name not in ready and await state.engine.remove_lora(name):
                report.unloaded.append(name)  # composed-<hash> names carry no "@": never unloaded here
        return report


def _scan(state: ServiceState) -> tuple[ReloadReport, set[str]]:
    with state.stack.sessions() as session:
        rows = registry.list_adapters(session, base_model=state.stack.base_model_id)
        ready = [row for row in rows if row.state == AdapterState.READY]
        new = [row for row in ready if row.ref not in state.known_adapters]
        verified: list[str] = []
        failed: list[ReloadFailure] = []
        for row in new:
            try:
                registry.verify(row)
            except registry.ChecksumMismatch as exc:
                logger.warning("Reload: %s", exc)  # with its folder; the client's copy has none
                failed.append(ReloadFailure(ref=row.ref, detail=redact_paths(str(exc), (state.settings.data_dir,))))
            else:
                verified.append(row.ref)
    ready_refs = {row.ref for row in ready}
    state.known_adapters = (state.known_adapters & ready_refs) | set(verified)
    report = ReloadReport(
        adapters=len(rows), ready=len(ready), new=verified, verified=len(new), failed=failed, unloaded=[]
    )
    return report, ready_refs
