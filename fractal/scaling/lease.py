"""Leadership of the scaler: a lease row taken and renewed by compare-and-set, with a fencing token.

Any number of scaler replicas may run; the one holding the lease runs the pass, the others skip. Unlike a
session-level advisory lock, the lease lives in a row, so it works through PgBouncer's transaction pooling (each
statement may land on another server connection), and it expires on the database's clock: a SIGKILLed or
partitioned leader is replaced within one lease period. The fencing token grows whenever the lease changes hands;
the pass checks it before every cloud call and the statements that record launches include it, so a leader that
was paused past its lease (and has been replaced) cannot act when it wakes up.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, case, exists, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fractal.clock import db_now
from fractal.database import is_postgres
from fractal.models import Lease

__all__ = [
    "SCALER_LEASE",
    "LeaseLost",
    "LeaseToken",
    "acquire_lease",
    "holder_identity",
    "lease_holds",
    "release_lease",
]

SCALER_LEASE = "scaler"


class LeaseLost(RuntimeError):
    """The lease expired or passed to another holder while this one was working: stop acting."""


@dataclass(frozen=True)
class LeaseToken:
    """Proof of leadership: which lease, who holds it, and the fencing token it was granted with."""

    name: str
    holder: str
    fencing_token: int


def holder_identity() -> str:
    """Unique per process and start: host, pid and a random suffix (a restarted process is a new holder)."""
    return f"{socket.gethostname()[:200]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def acquire_lease(session: Session, *, name: str, holder: str, ttl_s: float) -> LeaseToken | None:
    """Take or renew the lease in one compare-and-set statement; None when another holder's lease is live.

    The same holder renews (same token); a free or expired lease is taken with the token plus one. Commits.
    """
    dialect_insert = postgresql.insert if is_postgres(session) else sqlite.insert
    statement = dialect_insert(Lease).values(
        name=name, holder=holder, fencing_token=1, acquired_at=db_now(live=True), expires_at=db_now(ttl_s, live=True)
    )
    current = statement.excluded
    renewing = and_(Lease.holder == holder, Lease.expires_at > db_now(live=True))
    upsert = statement.on_conflict_do_update(
        index_elements=[Lease.name],
        set_={
            "holder": current.holder,
            "fencing_token": _if(renewing, Lease.fencing_token, Lease.fencing_token + 1),
            "acquired_at": _if(renewing, Lease.acquired_at, current.acquired_at),
            "expires_at": current.expires_at,
        },
        where=(Lease.holder == holder) | (Lease.expires_at <= db_now(live=True)),
    ).returning(Lease.fencing_token)
    token = session.execute(upsert).scalar()
    session.commit()
    return LeaseToken(name, holder, int(token)) if token is not None else None


def _if(condition: ColumnElement[bool], then: object, otherwise: object) -> ColumnElement[object]:
    return case((condition, then), else_=otherwise)


def lease_holds(token: LeaseToken) -> ColumnElement[bool]:
    """SQL that is true while ``token`` still holds its lease (unexpired, same holder, same fencing token): put it
    in the WHERE of a statement that records an action, so a stale leader's write matches nothing."""
    return exists().where(
        Lease.name == token.name,
        Lease.holder == token.holder,
        Lease.fencing_token == token.fencing_token,
        Lease.expires_at > db_now(live=True),
    )


def check_lease(session: Session, token: LeaseToken) -> None:
    """Right before a cloud call: raise LeaseLost unless ``token`` still holds its lease.

    It ends the transaction it reads in (call it with nothing pending), so no transaction stays open, idle,
    across the slow call that follows (the server would end it at idle_in_transaction_session_timeout).
    """
    holds = bool(session.execute(select(lease_holds(token))).scalar())
    session.commit()
    if not holds:
        raise LeaseLost(f"the {token.name} lease (token {token.fencing_token}) is no longer held by {token.holder}")


def release_lease(session: Session, token: LeaseToken) -> None:
    """Give the lease up at once (a clean shutdown), so the next replica need not wait for it to expire. Commits."""
    session.execute(
        update(Lease)
        .where(Lease.name == token.name, Lease.holder == token.holder, Lease.fencing_token == token.fencing_token)
        .values(expires_at=db_now(live=True))
        .execution_options(synchronize_session=False)
    )
    session.commit()
