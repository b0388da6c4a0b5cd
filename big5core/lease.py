"""One lease for every background row: training jobs, assessments and reasoning runs.

A row that a process works on in the background carries ``lease_owner`` (who works on it,
:func:`big5core.heartbeat.owner_id`) and ``lease_expires_at``. The owner renews the lease while it works
(:func:`renew`, a compare-and-set on owner and state); a live row whose lease ran out belongs to a process
that stopped (killed, hung, its machine gone), and whoever looks next takes it over (the job queue's claim,
``big5 reason --resume``) or fails it (:func:`sweep`: the service's startup sweep of assessments and reasoning
runs). A live row that never had a lease counts as expired.

Every lease time comes from the database's clock (:class:`db_now`), never from a process's, so processes on
machines whose clocks disagree still agree on when a lease has expired.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Integer, bindparam, or_, select, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

INTERRUPTED = "interrupted: the process running it stopped"


def renewed_in_time(heartbeat_seconds: float, lease_seconds: float) -> bool:
    """The rule for every lease holder's settings: it renews more often than the lease runs out (a heartbeat
    at or above the lease lets every lease expire between renewals). Each caller words its own error."""
    return heartbeat_seconds < lease_seconds


class db_now(FunctionElement[datetime]):  # noqa: N801 - reads like the SQL function it stands for
    """The database server's current time (UTC), optionally plus ``seconds``.

    PostgreSQL: ``statement_timestamp() + n * interval '1 second'``; SQLite: ``strftime`` in the
    exact text format SQLAlchemy stores DateTime values in, so comparisons with stored values hold.
    """

    type = DateTime(timezone=True)
    inherit_cache = True
    name = "db_now"

    def __init__(self, seconds: int | float = 0) -> None:
        super().__init__(bindparam(None, seconds, type_=Integer if isinstance(seconds, int) else None))


@compiles(db_now)
def _db_now_default(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return f"(CURRENT_TIMESTAMP + ({compiler.process(element.clauses, **kw)}) * INTERVAL '1 second')"


@compiles(db_now, "postgresql")
def _db_now_postgresql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return f"(statement_timestamp() + ({compiler.process(element.clauses, **kw)}) * INTERVAL '1 second')"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', ({seconds}) || ' seconds')"


def database_time(session: Session, seconds: int | float = 0) -> datetime:
    """The database's clock as a Python datetime (naive on SQLite: it stores UTC without a zone)."""
    value = session.scalar(select(db_now(seconds)))
    assert isinstance(value, datetime), value
    return value


def taken(owner: str, seconds: int | float) -> dict[str, Any]:
    """The column values of a lease ``owner`` takes (or renews) for ``seconds`` from now."""
    return {"lease_owner": owner, "lease_expires_at": db_now(seconds)}


def expired(model: type[Any]) -> ColumnElement[bool]:
    """The row's lease ran out on the database's clock (or it never had one)."""
    return or_(model.lease_expires_at.is_(None), model.lease_expires_at < db_now())


def update_owned(
    session: Session, model: type[Any], row_id: str, owner: str, live: Iterable[str], values: dict[str, Any]
) -> bool:
    """UPDATE the row only while ``owner`` holds it in a live state; False when the lease was lost.

    The UPDATE also locks the row until the caller's transaction ends (on SQLite: the database), so a
    concurrent cancel, claim or sweep waits for it.
    """
    result = session.execute(
        update(model)
        .where(model.id == row_id, model.lease_owner == owner, model.state.in_(list(live)))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def renew(
    session: Session,
    model: type[Any],
    row_id: str,
    owner: str,
    seconds: int | float,
    live: Iterable[str],
    values: dict[str, Any] | None = None,
) -> bool:
    """Extend ``owner``'s lease by ``seconds`` from now (with ``values``); False when it no longer holds it."""
    return update_owned(session, model, row_id, owner, live, {**(values or {}), "lease_expires_at": db_now(seconds)})


def is_expired(session: Session, model: type[Any], row_id: str) -> bool:
    """Whether the row's lease ran out (a missing row counts as expired)."""
    return bool(session.scalar(select(expired(model)).where(model.id == row_id)) in (None, True, 1))


def sweep(session: Session, model: type[Any], live: Iterable[str], failed: str) -> list[str]:
    """End ``failed`` (error :data:`INTERRUPTED`) every live row whose lease expired; returns their ids.

    One UPDATE with the expiry in its WHERE: a row its owner renewed a moment before is not touched.
    """
    result = session.execute(
        update(model)
        .where(model.state.in_(list(live)), expired(model))
        .values(state=failed, error=INTERRUPTED, finished_at=db_now(), lease_expires_at=None)
        .returning(model.id)
        .execution_options(synchronize_session=False)
    )
    return list(result.scalars())
