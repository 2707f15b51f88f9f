"""The instance lifecycle: which status may follow which, the one mover, creation with a host secret, drain.

    PRE_CONNECTION → ACTIVE → DRAINING → TERMINATING → TERMINATED, with LOST when an ACTIVE or DRAINING host
    goes silent (then TERMINATING), and PRE_CONNECTION → TERMINATED when the cloud refused the launch.

Every instance status write goes through ``move_instances`` (creation through ``create_instance``): the UPDATE's
WHERE only matches rows whose current status may move to the target, so a refused move is a row that did not move.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Select, Table, and_, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningUpdate

from fractal.auth.hosts import generate_host_secret, hash_host_secret
from fractal.clock import db_now
from fractal.database import DriverStatement, ReusableStatements, one_of, sqlite_unindexed
from fractal.errors import ConflictError, InvalidTransitionError, NotFoundError
from fractal.events import EventKind, record_event, record_events
from fractal.models import Instance, InstanceStatus

__all__ = [
    "DRAINABLE_STATUSES",
    "RETIRED_STATUSES",
    "TRANSITIONS",
    "MovedInstance",
    "NewInstance",
    "create_instance",
    "drain_instance",
    "get_instance_fresh",
    "insert_instances",
    "instance_lock",
    "lock_instance_rows",
    "move_instances",
]

# The one table of allowed moves.
TRANSITIONS: Mapping[InstanceStatus, frozenset[InstanceStatus]] = {
    InstanceStatus.PRE_CONNECTION: frozenset(
        {InstanceStatus.ACTIVE, InstanceStatus.DRAINING, InstanceStatus.TERMINATING, InstanceStatus.TERMINATED}
    ),
    InstanceStatus.ACTIVE: frozenset({InstanceStatus.DRAINING, InstanceStatus.LOST}),
    InstanceStatus.DRAINING: frozenset({InstanceStatus.TERMINATING, InstanceStatus.LOST}),
    InstanceStatus.LOST: frozenset({InstanceStatus.TERMINATING}),
    InstanceStatus.TERMINATING: frozenset({InstanceStatus.TERMINATED}),
    InstanceStatus.TERMINATED: frozenset(),
}
# Hosts that must stop all work: they may not reconnect, and a heartbeat tells them to stop what they run.
RETIRED_STATUSES = frozenset({InstanceStatus.LOST, InstanceStatus.TERMINATING, InstanceStatus.TERMINATED})
DRAINABLE_STATUSES = frozenset(s for s, following in TRANSITIONS.items() if InstanceStatus.DRAINING in following)
# The audit event each arrival writes.
EVENT_FOR: Mapping[InstanceStatus, EventKind] = {
    InstanceStatus.ACTIVE: EventKind.INSTANCE_ACTIVATED,
    InstanceStatus.DRAINING: EventKind.INSTANCE_DRAINED,
    InstanceStatus.LOST: EventKind.INSTANCE_LOST,
    InstanceStatus.TERMINATING: EventKind.INSTANCE_TERMINATING,
    InstanceStatus.TERMINATED: EventKind.INSTANCE_TERMINATED,
}


_instances = cast(Table, Instance.__table__)


@dataclass(frozen=True)
class MovedInstance:
    """One row the mover changed."""

    instance_name: str
    region: str
    client_commit_hash: str
    live_mandelboxes: int


def allowed_from(to: InstanceStatus) -> frozenset[InstanceStatus]:
    """The statuses that may move to ``to``."""
    return frozenset(status for status, following in TRANSITIONS.items() if to in following)


def move_instances(
    session: Session,
    *,
    where: ColumnElement[bool],
    to: InstanceStatus,
    actor: str,
    reason: str,
    from_statuses: Collection[InstanceStatus] | None = None,
    values: Mapping[str, Any] | None = None,
    detail: Mapping[str, Any] | None = None,
    row_detail: Mapping[str, Mapping[str, Any]] | None = None,
    now: datetime | None = None,
    params: Mapping[str, Any] | None = None,
) -> list[MovedInstance]:
    """Move every instance matching ``where`` whose status may move to ``to``. One UPDATE; flushes only.

    The UPDATE waits for row locks (an in-flight assign's) and re-checks the status on the newest row version, so
    a move never lands on a row another transaction moved meanwhile. One event per moved row.

    Args:
        reason: why (recorded in each event: ``spare``, ``lost``, ``boot_timeout``, ``handshake``, ...).
        from_statuses: only rows in these statuses (a subset of those the table allows).
        values: other columns written with the move (e.g. the provider id, the live count).
        detail: more event detail; ``row_detail`` adds detail for one row (by instance name).
        now: the time written (tests); the database's clock when None.
        params: the values of bind parameters in ``where`` and ``values`` (not named ``move_now``). With them,
            ``where`` and ``values`` are reusable: the UPDATE is built once per pair of objects and kept (a hot
            caller passes module-level ones; see ``ReusableStatements``).

    Returns:
        The rows that moved.
    """
    allowed = set(allowed_from(to))
    if from_statuses is not None:
        allowed &= set(from_statuses)
    if not allowed:
        return []
    if params is not None and "move_now" in params:
        raise ValueError("params may not use the mover's own name move_now")
    # A Core UPDATE over the table's columns, on the session's connection: nothing in the session is synchronised
    # (it never was: the rows are read back from RETURNING), so the ORM's bulk-update path would only cost CPU.
    # What the session holds unflushed is written first, as its autoflush would.
    if session.autoflush:
        session.flush()
    shape = (to, frozenset(allowed), now is not None)
    written = {**(params or {}), **({"move_now": now} if now is not None else {})}
    if params is None:
        rows: Sequence[Any] = session.connection().execute(_move_statement(where, values, *shape), written).all()
    else:  # built once and kept, so run on the driver (a condition with an IN list keeps SQLAlchemy's path)
        reusable = _REUSABLE.get(
            (where, values), shape, lambda: DriverStatement(_move_statement(where, values, *shape), strict=False)
        )
        rows = reusable.execute(session.connection(), written).rows
    moved = [
        MovedInstance(
            instance_name=row.instance_name,
            region=row.region,
            client_commit_hash=row.client_commit_hash,
            live_mandelboxes=row.live_mandelboxes,
        )
        for row in rows
    ]
    record_events(
        session,
        [
            {
                "kind": EVENT_FOR[to],
                "actor": actor,
                "instance_name": m.instance_name,
                "detail": {
                    "reason": reason,
                    "status": str(to),
                    "region": m.region,
                    "client_commit_hash": m.client_commit_hash,
                    "live_mandelboxes": m.live_mandelboxes,
                    **(detail or {}),
                    **((row_detail or {}).get(m.instance_name) or {}),
                },
            }
            for m in moved
        ],
    )
    return moved


def instance_lock(which: ColumnElement[bool], *, skip_locked: bool = False) -> Select[tuple[str]]:
    """The statement that locks the instance rows matching ``which`` in name order (the fleet's lock order) and
    returns their names: what ``lock_instance_rows`` runs, for movers that build it once or name the rows by a
    subquery.

    FOR NO KEY UPDATE: it conflicts with assignment's lock on the same row but not with the KEY SHARE that
    heartbeat rows take through their foreign key, so heartbeats never wait.
    """
    return (
        select(_instances.c.instance_name)
        .where(which)
        .order_by(_instances.c.instance_name)
        .with_for_update(key_share=True, skip_locked=skip_locked)
    )


def _move_statement(
    where: ColumnElement[bool],
    values: Mapping[str, Any] | None,
    to: InstanceStatus,
    allowed: frozenset[InstanceStatus],
    has_now: bool,
) -> ReturningUpdate[tuple[str, str, str, int]]:
    stamp = bindparam("move_now", type_=_instances.c.status_changed_at.type) if has_now else db_now()
    return (
        update(_instances)
        # The allowed statuses as equalities (it can run as a DriverStatement), a re-check of the rows ``where``
        # finds: on SQLite no index serves it, or SQLite walks every ACTIVE host's row for a move by name.
        .where(and_(where, one_of(sqlite_unindexed(_instances.c.status), allowed)))
        .values(status=to, status_changed_at=stamp, **(values or {}))
        .returning(
            _instances.c.instance_name,
            _instances.c.region,
            _instances.c.client_commit_hash,
            _instances.c.live_mandelboxes,
        )
    )


# Reusable conditions' UPDATEs (``params`` given), by the condition and values objects and the move's shape.
_REUSABLE: ReusableStatements[DriverStatement] = ReusableStatements()


def lock_instance_rows(session: Session, names: Sequence[str], *, skip_locked: bool = False) -> list[str]:
    """Lock instance rows in name order (the fleet's lock order, see ``instance_lock``); returns the names locked."""
    if not names:
        return []
    which = _instances.c.instance_name.in_(sorted(set(names)))
    return list(session.scalars(instance_lock(which, skip_locked=skip_locked)))


@dataclass(frozen=True)
class NewInstance:
    """What an instance row is created from; the host secret is made by ``insert_instances``."""

    instance_name: str
    region: str
    client_commit_hash: str
    ami_id: str
    instance_type: str
    mandelbox_capacity: int
    status: InstanceStatus = InstanceStatus.PRE_CONNECTION
    cloud_provider_id: str | None = None


def _row(new: NewInstance, secret: str, now: Any) -> dict[str, Any]:
    return {
        "instance_name": new.instance_name,
        "region": new.region,
        "client_commit_hash": new.client_commit_hash,
        "ami_id": new.ami_id,
        "instance_type": new.instance_type,
        "mandelbox_capacity": new.mandelbox_capacity,
        "live_mandelboxes": 0,
        "status": new.status,
        "cloud_provider_id": new.cloud_provider_id,
        "host_secret_hash": hash_host_secret(secret),
        "created_at": now,
        "status_changed_at": now,
        "empty_since": now,
    }


def insert_instances(session: Session, new: Sequence[NewInstance], *, now: datetime) -> dict[str, str]:
    """Insert many instance rows in one statement, each with a fresh host secret. Flushes only.

    Returns:
        instance name → plaintext host secret (handed to the host once; only its hash is stored).
    """
    secrets_by_name = {n.instance_name: generate_host_secret() for n in new}
    if new:
        # A Core insert over the table on the session's connection (the same rows; an ORM insert takes the bulk
        # persistence path, several times the statement's own cost). Pending ORM changes are written first, as the
        # session's autoflush would.
        if session.autoflush:
            session.flush()
        session.connection().execute(_INSERT_INSTANCES, [_row(n, secrets_by_name[n.instance_name], now) for n in new])
    return secrets_by_name


_INSERT_INSTANCES = insert(_instances)


def create_instance(
    session: Session, *, new: NewInstance, actor: str, now: datetime, event_kind: EventKind | str
) -> tuple[Instance, str]:
    """Insert one instance with a fresh host secret and record an event. Flushes only; the caller commits.

    Returns:
        The new row and the plaintext host secret (shown once; only its hash is stored).

    Raises:
        ConflictError: the name or the cloud provider id is already taken (the caller's transaction survives).
    """
    secret = generate_host_secret()
    instance = Instance(**_row(new, secret, now))
    # A savepoint keeps the caller's transaction usable when the unique constraints refuse the row.
    try:
        with session.begin_nested():
            session.add(instance)
    except IntegrityError as exc:
        raise ConflictError(
            "An instance with this name or cloud provider id already exists.",
            details={"instance_name": new.instance_name},
        ) from exc
    record_event(
        session,
        kind=event_kind,
        actor=actor,
        instance_name=new.instance_name,
        detail={
            "region": new.region,
            "client_commit_hash": new.client_commit_hash,
            "ami_id": new.ami_id,
            "instance_type": new.instance_type,
            "mandelbox_capacity": new.mandelbox_capacity,
            "status": str(new.status),
            "cloud_provider_id": new.cloud_provider_id,
        },
    )
    session.flush()
    return instance, secret


def get_instance_fresh(session: Session, *, instance_name: str) -> Instance:
    """The instance as the database has it now (bypassing the session's identity map).

    Raises:
        NotFoundError.
    """
    instance = session.execute(
        select(Instance).where(Instance.instance_name == instance_name).execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if instance is None:
        raise NotFoundError("No such instance.")
    return instance


def drain_instance(session: Session, *, instance_name: str, actor: str) -> Instance:
    """Move an ACTIVE or PRE_CONNECTION instance to DRAINING so it takes no new mandelboxes. Commits.

    Draining a DRAINING instance again changes nothing. Once this returns, no later assignment lands on it: the
    mover's UPDATE waits for the row lock an in-flight assign holds (FOR NO KEY UPDATE) and re-checks the status
    on the newest row version, so every assign that could see the instance ACTIVE has committed before the
    drain returns, and every later one sees DRAINING.

    Raises:
        NotFoundError: no such instance.
        InvalidTransitionError: the instance is TERMINATING, TERMINATED or LOST.
    """
    moved = move_instances(
        session, where=Instance.instance_name == instance_name, to=InstanceStatus.DRAINING, actor=actor, reason="admin"
    )
    if moved:
        session.commit()
        return get_instance_fresh(session, instance_name=instance_name)
    status = session.execute(
        select(Instance.status).where(Instance.instance_name == instance_name)
    ).scalar_one_or_none()
    session.rollback()
    if status is None:
        raise NotFoundError("No such instance.")
    if status is InstanceStatus.DRAINING:
        return get_instance_fresh(session, instance_name=instance_name)
    raise InvalidTransitionError(
        f"A {status} instance cannot be drained.", details={"instance_name": instance_name, "status": str(status)}
    )
