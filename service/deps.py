"""Dependencies as ``Annotated`` aliases (``StateDep``, ``SessionDep``, ``ClientDep``, ``AdminDep``...).

Authentication: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, checked against
``settings.service.api_keys`` (clients) and ``admin_keys`` (admins, who may also do what clients do).
With both lists empty, authentication is off and every caller is an anonymous admin: the default of a
single-user machine, which ``big5 serve`` allows only on a loopback address unless told
``--insecure-no-auth`` (:func:`check_exposure`). A caller is known by a key id (a sha256 prefix of its
key, never the key), which scopes the assessments it sees.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from sqlalchemy.orm import Session

from big5core.settings import ServiceSettings
from big5engine.errors import EngineNotReady
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


# ---------------------------------------------------------------- authentication


@dataclass(frozen=True)
class Principal:
    """Who calls: ``anonymous`` exists only while authentication is off (no key configured at all)."""

    role: Literal["anonymous", "client", "admin"]
    key_id: str | None = None  # key_id() of the caller's key; None for the anonymous caller

    @property
    def is_admin(self) -> bool:
        return self.role in ("admin", "anonymous")


def key_id(key: str) -> str:
    """A stable, non-secret name of an API key (what assessments record as their owner)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _matches(key: str, keys: Sequence[SecretStr]) -> bool:
    given = key.encode()
    return any(hmac.compare_digest(given, k.get_secret_value().encode()) for k in keys)


def authenticate(service: ServiceSettings, key: str | None) -> Principal:
    """The principal of ``key``; Unauthorized when keys are configured and it is missing or unknown."""
    if not service.auth_enabled:
        return Principal("anonymous")
    if not key:
        raise Unauthorized("an API key is required: send Authorization: Bearer <key> or X-API-Key: <key>")
    if _matches(key, service.admin_keys):
        return Principal("admin", key_id(key))
    if _matches(key, service.api_keys):
        return Principal("client", key_id(key))
    raise Unauthorized("the API key is not valid")


def require_client(
    state: StateDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> Principal:
    key = (bearer.credentials if bearer is not None else None) or api_key
    return authenticate(state.settings.service, key)


ClientDep = Annotated[Principal, Depends(require_client)]


def require_admin(principal: ClientDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this route needs an admin key")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


def require_metrics_access(
    state: StateDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> None:
    """GET /metrics: any valid key while keys are set (it lists adapter refs), unless ``metrics_public``."""
    if not state.settings.service.metrics_public:
        require_client(state, bearer, api_key)


# ---------------------------------------------------------------- exposure at start


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class InsecureExposure(RuntimeError):
    """``big5 serve`` would answer every caller on a reachable interface as an admin."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the names of localhost; False for 0.0.0.0, ::, any other address or name."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_exposure(service: ServiceSettings, host: str) -> tuple[int, str]:
    """The log level and line that say how callers are authenticated when serving on ``host``.

    Raises InsecureExposure when no key is configured, ``host`` is not a loopback address and
    ``insecure_no_auth`` is off: authentication is then meant to be on but a secret is missing.
    """
    if service.auth_enabled:
        return logging.INFO, (
            f"Authentication is on: {len(service.api_keys)} client key(s), {len(service.admin_keys)} admin key(s)"
        )
    if is_loopback(host):
        return logging.WARNING, (
            f"Authentication is OFF (no API keys configured): every caller is an admin; bound to loopback {host} only"
        )
    if not service.insecure_no_auth:
        raise InsecureExposure(
            f"refusing to serve on {host} without API keys: every caller would be an admin. Set "
            "BIG5_SERVICE__API_KEYS and BIG5_SERVICE__ADMIN_KEYS (JSON lists, e.g. '[\"<key>\"]'), bind to "
            "127.0.0.1, or pass --insecure-no-auth (BIG5_SERVICE__INSECURE_NO_AUTH=1) to accept it"
        )
    return logging.WARNING, (
        f"Authentication is OFF on {host} (--insecure-no-auth): every caller that reaches this port is an admin "
        "and may train, reload adapters and read every assessment"
    )
