"""Leadership of the scaler: a lease row taken and renewed by compare-and-set, with a fencing token.

Any number of scaler replicas may run; the one holding the lease runs the pass, the others skip. Unlike a
session-level advisory lock, the lease lives in a row, so it works through PgBouncer's transaction pooling (each
statement may land on another server connection), and it expires on the database's clock: a SIGKILLed or
partitioned leader is replaced within one lease period. The fencing token grows whenever the lease changes hands;
the pass renews it (compare-and-set again) before every cloud call, so a pass longer than one lease period keeps
it while it is alive, and every transaction that records what the cloud did begins by locking the lease row and
checking the token (``fence``), so a leader that was paused past its lease (and has been replaced) can neither act
nor record anything when it wakes up.

The cloud cannot check a fencing token, so the cloud calls are fenced by time instead: each renewal yields the
instant until which the lease certainly holds, and a launch or terminate request is refused at the last moment
before it goes on the wire (botocore's before-send hook) once that instant has passed, so a leader paused between
its renewal and its request does not send it on waking. A request sent in time but answered late was made while
the lease held; its row is marked ``pending:``, so the successor treats it as an unconfirmed launch and terminates
the host by its name tag.
"""

from __future__ import annotations

import functools
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import cast

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Integer,
    String,
    Table,
    and_,
    bindparam,
    case,
    exists,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fractal.clock import db_now
from fractal.database import DriverStatement, is_postgres
from fractal.models import Lease

__all__ = [
    "SCALER_LEASE",
    "LeaseLost",
    "LeaseToken",
    "acquire_lease",
    "check_lease",
    "fence",
    "holder_identity",
    "lease_holds",
    "release_lease",
]

SCALER_LEASE = "scaler"
# How long before the lease's end a cloud request must have been sent (its trip to the cloud).
SEND_MARGIN_S = 1.0


class LeaseLost(RuntimeError):
    """The lease expired or passed to another holder while this one was working: stop acting."""


@dataclass(frozen=True)
class LeaseToken:
    """Proof of leadership: which lease, who holds it, and the fencing token it was granted with."""

    name: str
    holder: str
    fencing_token: int
    ttl_s: float  # each renewal (check_lease) extends the lease this long from the database's now


def holder_identity() -> str:
    """Unique per process and start: host, pid and a random suffix (a restarted process is a new holder)."""
    return f"{socket.gethostname()[:200]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def acquire_lease(session: Session, *, name: str, holder: str, ttl_s: float) -> LeaseToken | None:
    """Take or renew the lease in one compare-and-set statement; None when another holder's lease is live.

    The same holder renews (same token); a free or expired lease is taken with the token plus one. Commits.
    """
    upsert = _acquire_statement(is_postgres(session), ttl_s)
    token = upsert.execute(session, {"lease_name": name, "lease_holder": holder}).scalar()
    session.commit()
    return LeaseToken(name, holder, int(token), ttl_s) if token is not None else None


# The lease's statements are built once per process (per backend and lease period: the period is rendered into the
# SQL) with the lease's name, holder and token as bound parameters, rather than on every call: building one cost more
# than running it on the scaler's hot path (every pass acquires and releases; check_lease runs before every cloud
# call). Their SQL holds no instant of its own (db_now renders the clock), so a statement built once stays right.
_NAME: BindParameter[str] = bindparam("lease_name", type_=String())
_HOLDER: BindParameter[str] = bindparam("lease_holder", type_=String())
_TOKEN: BindParameter[int] = bindparam("lease_token", type_=Integer())
# Over the table's columns, not the mapped class's: DML on a mapped class takes the ORM's bulk-persistence path,
# which cost ten times the statement itself (the lease's upsert about 0.6 ms of CPU, every pass).
_leases = cast(Table, Lease.__table__)
_HELD = and_(
    _leases.c.name == _NAME,
    _leases.c.holder == _HOLDER,
    _leases.c.fencing_token == _TOKEN,
    _leases.c.expires_at > db_now(live=True),
)


def _bound(token: LeaseToken) -> dict[str, object]:
    return {"lease_name": token.name, "lease_holder": token.holder, "lease_token": token.fencing_token}


@functools.lru_cache(maxsize=8)
def _acquire_statement(on_postgres: bool, ttl_s: float) -> DriverStatement:
    dialect_insert = postgresql.insert if on_postgres else sqlite.insert
    statement = dialect_insert(_leases).values(
        name=_NAME, holder=_HOLDER, fencing_token=1, acquired_at=db_now(live=True), expires_at=db_now(ttl_s, live=True)
    )
    current = statement.excluded
    lease = _leases.c
    renewing = and_(lease.holder == _HOLDER, lease.expires_at > db_now(live=True))
    return DriverStatement(
        statement.on_conflict_do_update(
            index_elements=[lease.name],
            set_={
                "holder": current.holder,
                "fencing_token": _if(renewing, lease.fencing_token, lease.fencing_token + 1),
                "acquired_at": _if(renewing, lease.acquired_at, current.acquired_at),
                "expires_at": current.expires_at,
            },
            where=(lease.holder == _HOLDER) | (lease.expires_at <= db_now(live=True)),
        ).returning(lease.fencing_token)
    )


@functools.lru_cache(maxsize=8)
def _renew_statement(ttl_s: float) -> DriverStatement:
    return DriverStatement(
        update(_leases).where(_HELD).values(expires_at=db_now(ttl_s, live=True)).returning(_leases.c.fencing_token)
    )


_FENCE = DriverStatement(select(_leases.c.fencing_token).where(_HELD).with_for_update(read=True))
_RELEASE = DriverStatement(
    update(_leases)
    .where(_leases.c.name == _NAME, _leases.c.holder == _HOLDER, _leases.c.fencing_token == _TOKEN)
    .values(expires_at=db_now(live=True))
)


def _if(condition: ColumnElement[bool], then: object, otherwise: object) -> ColumnElement[object]:
    return case((condition, then), else_=otherwise)


def lease_holds(token: LeaseToken, *, in_subquery: bool = True) -> ColumnElement[bool]:
    """SQL that is true while ``token`` still holds its lease (unexpired, same holder, same fencing token).

    By default an EXISTS over ``leases`` (for the WHERE of a statement on another table); ``in_subquery=False``
    gives the bare condition on the ``leases`` row itself."""
    condition = and_(
        Lease.name == token.name,
        Lease.holder == token.holder,
        Lease.fencing_token == token.fencing_token,
        Lease.expires_at > db_now(live=True),
    )
    return exists().where(condition) if in_subquery else condition


def check_lease(session: Session, token: LeaseToken, *, held_until: float | None = None) -> float:
    """Right before a cloud call: renew the lease by compare-and-set, or raise LeaseLost. Returns the instant
    (``time.monotonic()``) until which the lease is certainly still held, for ``fractal.cloud.base.send_deadline``.

    ``held_until``: what the caller's previous check returned (a step's calls, one after the other). While it leaves
    more than half the lease period, the lease is known held until then and nothing is sent (no statement, no
    commit): no other holder can take an unexpired lease, so a renewal would only push its end further; the first
    check of a step, and the first once half the period has gone, renew. A launch of many hosts thus costs one
    renewal, not one per host, and a step longer than the period still renews within every period.

    The renewal matches only while ``token`` still holds (same holder and fencing token, unexpired) and extends the
    expiry to ``ttl_s`` from the database's now, so a pass that takes longer than one lease period keeps the lease
    as long as it is alive, while one that stalls past it has lost it for good. It commits (call it with nothing
    pending), so no transaction stays open, idle, across the slow call that follows (the server would end it at
    idle_in_transaction_session_timeout).

    The instant returned is measured from before the renewal was sent (the database set the expiry later than
    that), less a margin for the request's trip to the cloud: a request sent before it reaches the cloud while the
    lease holds, and one the caller was too stalled to send in time is not sent at all.
    """
    sent = time.monotonic()
    if held_until is not None and held_until - sent > token.ttl_s / 2:
        return held_until
    renewed = _renew_statement(token.ttl_s).execute(session, _bound(token)).scalar()
    session.commit()
    if renewed is None:
        raise LeaseLost(f"the {token.name} lease (token {token.fencing_token}) is no longer held by {token.holder}")
    return sent + token.ttl_s - min(SEND_MARGIN_S, token.ttl_s / 10)


def fence(session: Session, token: LeaseToken) -> None:
    """First statement of a transaction that records actions: lock the lease row and raise LeaseLost unless
    ``token`` still holds it.

    The row lock (FOR SHARE) lasts until the caller's transaction ends, and taking over the lease updates that row,
    so no successor can take the lease while the transaction records; and a stale leader's transaction stops here,
    before it writes anything. Neither commits nor rolls back: on LeaseLost the caller's transaction is abandoned.
    """
    held = _FENCE.execute(session, _bound(token)).scalar()
    if held is None:
        raise LeaseLost(f"the {token.name} lease (token {token.fencing_token}) is no longer held by {token.holder}")


def release_lease(session: Session, token: LeaseToken) -> None:
    """Give the lease up at once (a clean shutdown), so the next replica need not wait for it to expire. Commits."""
    _RELEASE.execute(session, _bound(token))
    session.commit()
