"""Dependencies as ``Annotated`` aliases (``StateDep``, ``SessionDep``, ``ClientDep``, ``AdminDep``...).

Authentication: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, checked against
``settings.service.api_keys`` (clients) and ``admin_keys`` (admins, who may also do what clients do).
With both lists empty, authentication is off: the embedded default for a single-user machine.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from sqlalchemy.orm import Session

from big5core.engine import EngineNotReady
from evaluator.reasoning.runner import ReasoningRunner
from evaluator.runner import AssessmentRunner
from service.errors import Forbidden, Unauthorized
from service.serving import GenerationService
from service.state import ServiceState

_bearer = HTTPBearer(auto_error=False, description="An API key as a bearer token.")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")


def find_state(request: Request) -> ServiceState | None:
    """The running service's state, None while the lifespan builds it (the one accessor of ``app.state``)."""
    state: ServiceState | None = getattr(request.app.state, "service", None)
    return state


def get_state(state: Annotated[ServiceState | None, Depends(find_state)]) -> ServiceState:
    if state is None:
        raise EngineNotReady("the service is still starting")
    return state


MaybeStateDep = Annotated[ServiceState | None, Depends(find_state)]
StateDep = Annotated[ServiceState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    """A database session for the request; routes that write commit themselves."""
    with state.stack.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_serving(state: StateDep) -> GenerationService:
    return state.serving


ServingDep = Annotated[GenerationService, Depends(get_serving)]


def get_runner(state: StateDep) -> AssessmentRunner:
    """The assessment runner; 503 while the engine cannot run assessments."""
    if not state.engine.ready:
        raise EngineNotReady(state.engine.error or "the engine is starting")
    return state.runner


def get_reasoning_runner(state: StateDep) -> ReasoningRunner:
    """The reasoning runner built by the lifespan (its routes check the engine where they need it)."""
    return state.reasoning


# ---------------------------------------------------------------- authentication


@dataclass(frozen=True)
class Principal:
    role: Literal["anonymous", "client", "admin"]

    @property
    def is_admin(self) -> bool:
        return self.role != "client"  # anonymous only exists when authentication is off


def _matches(key: str, keys: Sequence[SecretStr]) -> bool:
    given = key.encode()
    return any(hmac.compare_digest(given, k.get_secret_value().encode()) for k in keys)


def require_client(
    state: StateDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> Principal:
    service = state.settings.service
    if not service.api_keys and not service.admin_keys:
        return Principal("anonymous")
    key = (bearer.credentials if bearer is not None else None) or api_key
    if not key:
        raise Unauthorized("an API key is required: send Authorization: Bearer <key> or X-API-Key: <key>")
    if _matches(key, service.admin_keys):
        return Principal("admin")
    if _matches(key, service.api_keys):
        return Principal("client")
    raise Unauthorized("the API key is not valid")


ClientDep = Annotated[Principal, Depends(require_client)]


def require_admin(principal: ClientDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this route needs an admin key")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
