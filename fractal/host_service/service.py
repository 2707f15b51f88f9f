"""The host protocol: handshake, heartbeats and mandelbox status reports.

Heartbeats are the hot path (every host, every few seconds): they write only the ``heartbeats`` table and read
the instance without locking it, so they never contend with assignment, which locks instance rows.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, cast

import structlog
from sqlalchemy import Engine, Table, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fractal.auth.hosts import instance_name_for_secret_hash
from fractal.clock import utcnow
from fractal.database import DriverStatement, is_postgres, run_in_own_transaction
from fractal.errors import FractalError, HostMismatchError, InvalidTransitionError, NotFoundError, UnauthorizedError
from fractal.events import EventKind, record_event
from fractal.fleet.instances import RETIRED_STATUSES, move_instances
from fractal.fleet.mandelboxes import HOST_REPORTABLE, move_mandelboxes
from fractal.models import EndReason, Heartbeat, Instance, InstanceStatus, Mandelbox, MandelboxStatus

log = structlog.get_logger(__name__)

_instances = cast(Table, Instance.__table__)
_heartbeats = cast(Table, Heartbeat.__table__)


@dataclass(frozen=True)
class HandshakeResult:
    status: InstanceStatus
    heartbeat_interval_s: float


@dataclass(frozen=True)
class HeartbeatAnswer:
    status: InstanceStatus
    heartbeat_interval_s: float
    stop_mandelboxes: list[uuid.UUID]


@dataclass(frozen=True)
class HostMandelboxView:
    mandelbox_id: uuid.UUID
    user_id: str
    session_id: str | None
    status: MandelboxStatus


def _actor(instance_name: str) -> str:
    return f"host:{instance_name}"


def _require_own_name(authenticated: str, claimed: str) -> None:
    # A secret authenticates one instance; claiming another name gets the same 401 as a wrong secret.
    if claimed != authenticated:
        raise UnauthorizedError()


def _refuse(
    session: Session, *, instance_name: str, action: str, error: FractalError, detail: dict[str, Any]
) -> NoReturn:
    """Undo the failed unit of work, record the refusal on its own, and raise."""
    session.rollback()
    log.warning("host_refused", instance_name=instance_name, action=action, code=str(error.code))
    record_event(
        session,
        kind=EventKind.HOST_REFUSED,
        actor=_actor(instance_name),
        instance_name=instance_name,
        detail={"action": action, "code": str(error.code), **detail},
    )
    session.commit()
    raise error


# The instance as a handshake judges it, its row locked (built once, over the table's columns: nothing is loaded
# into the session; run on the driver).
_HANDSHAKE_INSTANCE = DriverStatement(
    select(
        _instances.c.status,
        _instances.c.client_commit_hash,
        _instances.c.live_mandelboxes,
        _instances.c.mandelbox_capacity,
        _instances.c.ip,
    )
    .where(_instances.c.instance_name == bindparam("p_instance_name"))
    .with_for_update(key_share=True)
)

# The handshake's move (module-level objects, so that the mover builds its UPDATE once): this instance becomes
# ACTIVE with the address and capacity it reported.
_HANDSHAKING = _instances.c.instance_name == bindparam("handshake_instance_name")
_HANDSHAKE_VALUES = {
    "ip": bindparam("handshake_ip", type_=_instances.c.ip.type),
    "mandelbox_capacity": bindparam("handshake_capacity", type_=_instances.c.mandelbox_capacity.type),
}


def handshake_host(
    session: Session,
    *,
    authenticated_instance: str,
    instance_name: str,
    ip: str,
    client_commit_hash: str,
    mandelbox_capacity: int,
    heartbeat_interval_s: float,
    now: datetime | None = None,
) -> HandshakeResult:
    """A host announces itself: PRE_CONNECTION becomes ACTIVE with the reported ip and capacity.

    A restarted ACTIVE or DRAINING host keeps its status (its ip and capacity are refreshed).

    Raises:
        UnauthorizedError: the secret belongs to another instance.
        HostMismatchError: the commit hash differs from the row, or the capacity is below the live count.
        InvalidTransitionError: the instance is TERMINATING, TERMINATED or LOST.
    """
    _require_own_name(authenticated_instance, instance_name)
    now = now or utcnow()
    # Handshakes are rare: locking the row here is fine, and it orders us against drains and sweeps.
    instance = _HANDSHAKE_INSTANCE.execute(session, {"p_instance_name": instance_name}).one()
    if instance.status in RETIRED_STATUSES:
        status = instance.status
        _refuse(
            session,
            instance_name=instance_name,
            action="handshake",
            error=InvalidTransitionError(
                f"This instance is {status} and cannot reconnect.", details={"status": str(status)}
            ),
            detail={"status": str(status)},
        )
    if instance.client_commit_hash != client_commit_hash:
        expected = instance.client_commit_hash
        _refuse(
            session,
            instance_name=instance_name,
            action="handshake",
            error=HostMismatchError(
                "The host runs a different client commit hash than registered.",
                # Never the registered commit: whoever holds a secret must not learn what to claim (the event
                # below keeps it for operators).
                details={"client_commit_hash": client_commit_hash},
            ),
            detail={"expected": expected, "reported": client_commit_hash},
        )
    if mandelbox_capacity < instance.live_mandelboxes:
        live = instance.live_mandelboxes
        _refuse(
            session,
            instance_name=instance_name,
            action="handshake",
            error=HostMismatchError(
                "The reported capacity is below the instance's live mandelboxes.",
                details={"mandelbox_capacity": mandelbox_capacity, "live_mandelboxes": live},
            ),
            detail={"reported_capacity": mandelbox_capacity, "live_mandelboxes": live},
        )

    previous_status, previous_capacity, previous_ip = instance.status, instance.mandelbox_capacity, instance.ip
    seen = {"from": str(previous_status), "ip": ip, "previous_ip": previous_ip}
    if previous_status is InstanceStatus.PRE_CONNECTION:
        move_instances(
            session,
            where=_HANDSHAKING,
            values=_HANDSHAKE_VALUES,
            params={
                "handshake_instance_name": instance_name,
                "handshake_ip": ip,
                "handshake_capacity": mandelbox_capacity,
            },
            to=InstanceStatus.ACTIVE,
            actor=_actor(instance_name),
            reason="handshake",
            detail=seen,
        )
        status = InstanceStatus.ACTIVE
    else:
        # A restarted host: same status, its new address and capacity.
        session.execute(
            update(Instance)
            .where(Instance.instance_name == instance_name)
            .values(ip=ip, mandelbox_capacity=mandelbox_capacity)
            .execution_options(synchronize_session=False)
        )
        status = previous_status
        record_event(
            session,
            kind=EventKind.INSTANCE_RECONNECTED,
            actor=_actor(instance_name),
            instance_name=instance_name,
            detail={**seen, "status": str(status)},
        )
    if previous_capacity != mandelbox_capacity:
        record_event(
            session,
            kind=EventKind.INSTANCE_CAPACITY_CHANGED,
            actor=_actor(instance_name),
            instance_name=instance_name,
            detail={"from": previous_capacity, "to": mandelbox_capacity},
        )
    _upsert_heartbeat(session, instance_name=instance_name, now=now, metrics=None)
    session.commit()
    log.info("host_handshake", instance_name=instance_name, previous_status=str(previous_status), ip=ip)
    return HandshakeResult(status=status, heartbeat_interval_s=heartbeat_interval_s)


def record_heartbeat(
    database: Session | Engine,
    *,
    authenticated_instance: str,
    instance_name: str,
    mandelboxes: Sequence[tuple[uuid.UUID, MandelboxStatus]],
    metrics: dict[str, Any],
    heartbeat_interval_s: float,
    now: datetime | None = None,
    secret_digest: str | None = None,
) -> HeartbeatAnswer:
    """Note that the host is alive and tell it its status and which mandelboxes to stop.

    Writes only the heartbeats row; reads the instance and its mandelboxes without locking them.
    ``stop_mandelboxes`` holds this instance's DYING mandelboxes (user deletions) and every mandelbox the host
    reports as live that is not live on this instance any more (released by a sweep, or not its own).

    ``database``: the request's session, or the engine it would be bound to. On Postgres the work is one call of
    the ``fractal_heartbeat`` function: given the engine, on a pooled DBAPI connection in a transaction of its own
    (one round trip, no ORM session); given a session, in the session's connection, then committed. On SQLite
    the same work is done by portable statements (a session of its own when given the engine).

    ``secret_digest``: the digest of the secret the request came with, when ``authenticated_instance`` may come
    from a memo (``host_claimed``): it is checked, with the instance not being TERMINATED, by the statement that
    writes the heartbeat, and nothing is written when it does not match.

    Raises:
        UnauthorizedError: the secret belongs to another instance (or, with ``secret_digest``, to none any more).
    """
    _require_own_name(authenticated_instance, instance_name)
    now = now or utcnow()
    reported_live = [mid for mid, reported in mandelboxes if reported is not MandelboxStatus.EXITED]
    if is_postgres(database):
        found = _heartbeat_in_one_call(
            database,
            instance_name=instance_name,
            now=now,
            metrics=metrics,
            reported_live=reported_live,
            secret_digest=secret_digest,
        )
        if found is None:
            raise UnauthorizedError()
        status, dying, still_live = found
    elif isinstance(database, Engine):
        with Session(database) as session:
            status, dying, still_live = _heartbeat_in_session(
                session, instance_name, now, metrics, reported_live, secret_digest
            )
    else:
        status, dying, still_live = _heartbeat_in_session(
            database, instance_name, now, metrics, reported_live, secret_digest
        )
    stop = set(reported_live) if status in RETIRED_STATUSES else dying | (set(reported_live) - still_live)
    if stop:
        # Rare (a user ended a session, a sweep released a box): worth a line; a routine heartbeat has the access
        # log's line only.
        log.info("host_told_to_stop", instance_name=instance_name, status=str(status), stop=len(stop))
    return HeartbeatAnswer(status=status, heartbeat_interval_s=heartbeat_interval_s, stop_mandelboxes=sorted(stop))


def _heartbeat_in_session(
    session: Session,
    instance_name: str,
    now: datetime,
    metrics: dict[str, Any],
    reported_live: list[uuid.UUID],
    secret_digest: str | None,
) -> tuple[InstanceStatus, set[uuid.UUID], set[uuid.UUID]]:
    """The portable heartbeat (SQLite), committed; UnauthorizedError (nothing written) for a stale secret."""
    if secret_digest is not None and instance_name_for_secret_hash(session, secret_digest) != instance_name:
        session.rollback()
        raise UnauthorizedError()
    found = _heartbeat_portable(
        session, instance_name=instance_name, now=now, metrics=metrics, reported_live=reported_live
    )
    session.commit()
    return found


# The heartbeat's work on Postgres, one statement per form, each the body of a branch of the fractal_heartbeat
# function (below): upsert the heartbeats row (the only write; no instance row lock), read the instance's status,
# its DYING mandelboxes and which of the reported ones are still live on it. One scan (LATERAL) of the instance's
# live mandelboxes (the partial index ix_mandelboxes_live_instance) answers both lists, DYING being live. array_agg
# over no rows is NULL: read as none.
_HEARTBEAT_QUERY = """WITH beat AS (
    INSERT INTO heartbeats (instance_name, last_heartbeat_at, metrics)
    VALUES (p_instance_name, p_now, p_metrics)
    ON CONFLICT (instance_name) DO UPDATE
        SET last_heartbeat_at = EXCLUDED.last_heartbeat_at, metrics = EXCLUDED.metrics
    RETURNING instance_name
)
SELECT i.status::text, boxes.dying, boxes.still_live
FROM instances i JOIN beat ON beat.instance_name = i.instance_name, LATERAL (
    SELECT array_agg(m.mandelbox_id) FILTER (WHERE m.status = 'DYING') AS dying,
           array_agg(m.mandelbox_id) FILTER (WHERE m.mandelbox_id = ANY(p_reported)) AS still_live
    FROM mandelboxes m WHERE m.instance_name = p_instance_name AND m.status <> 'EXITED'
) AS boxes"""
# The same, for a caller authenticated from a memo: the secret's digest and the instance not being TERMINATED are
# checked by the statement itself, and the upsert writes nothing (no row comes back) when they do not hold. A
# data-modifying CTE runs whether or not the query reads it: the answer needs only the host.
_VERIFIED_HEARTBEAT_QUERY = """WITH host AS (
    SELECT instance_name, status FROM instances
    WHERE instance_name = p_instance_name AND host_secret_hash = p_digest AND status <> 'TERMINATED'
), beat AS (
    INSERT INTO heartbeats (instance_name, last_heartbeat_at, metrics)
    SELECT host.instance_name, p_now, p_metrics FROM host
    ON CONFLICT (instance_name) DO UPDATE
        SET last_heartbeat_at = EXCLUDED.last_heartbeat_at, metrics = EXCLUDED.metrics
)
SELECT host.status::text, boxes.dying, boxes.still_live
FROM host, LATERAL (
    SELECT array_agg(m.mandelbox_id) FILTER (WHERE m.status = 'DYING') AS dying,
           array_agg(m.mandelbox_id) FILTER (WHERE m.mandelbox_id = ANY(p_reported)) AS still_live
    FROM mandelboxes m WHERE m.instance_name = p_instance_name AND m.status <> 'EXITED'
) AS boxes"""

# Sent as text, the statement was parsed and planned on every heartbeat, and planning was most of its Postgres
# time (EXPLAIN ANALYZE on 1,000 hosts with 2 live mandelboxes each: ~0.26 ms planning, ~0.15 ms execution). A
# PL/pgSQL function keeps its statements' plans for the connection's life (and works behind PgBouncer's
# transaction pooling, unlike PREPARE). The function is created by a migration, as frozen text:
# heartbeat_function_sql() builds it from the statements above, and a test checks the migrated body is this one.
# It moves no status: what a heartbeat answers a retired host is decided here, in Python (RETIRED_STATUSES).
HEARTBEAT_FUNCTION = "fractal_heartbeat"
_HEARTBEAT_ARGS = (
    ("instance_name", "text"),
    ("digest", "text"),
    ("now", "timestamptz"),
    ("metrics", "jsonb"),
    ("reported", "uuid[]"),
)
_HEARTBEAT_RESULT = "instance_status text, dying uuid[], still_live uuid[]"
# The arguments in _HEARTBEAT_ARGS's order, in the driver's parameter style; the list of ids is sent as text[].
_HEARTBEAT_CALL = (
    "SELECT * FROM fractal_heartbeat(%(instance_name)s, %(digest)s, %(now)s, CAST(%(metrics)s AS jsonb),"
    " CAST(%(reported)s AS uuid[]))"
)
assert HEARTBEAT_FUNCTION + "(" in _HEARTBEAT_CALL
assert all(f"%({name})s" in _HEARTBEAT_CALL for name, _ in _HEARTBEAT_ARGS)
assert _HEARTBEAT_CALL.count("%(") == len(_HEARTBEAT_ARGS)


def heartbeat_function_body() -> str:
    """The PL/pgSQL body of fractal_heartbeat (what pg_proc.prosrc holds once migrated): the plain statement when
    no digest is given, else the verified one."""
    return (
        "\n#variable_conflict use_column\nBEGIN\n    IF p_digest IS NULL THEN\n        RETURN QUERY "
        + _HEARTBEAT_QUERY
        + ";\n    ELSE\n        RETURN QUERY "
        + _VERIFIED_HEARTBEAT_QUERY
        + ";\n    END IF;\nEND\n"
    )


def heartbeat_function_sql() -> str:
    """CREATE OR REPLACE FUNCTION fractal_heartbeat: what the migration that created it ran."""
    arguments = ", ".join(f"p_{name} {kind}" for name, kind in _HEARTBEAT_ARGS)
    return (
        f"CREATE OR REPLACE FUNCTION {HEARTBEAT_FUNCTION}({arguments})\n"
        f"RETURNS TABLE ({_HEARTBEAT_RESULT})\nLANGUAGE plpgsql VOLATILE AS $fn$" + heartbeat_function_body() + "$fn$"
    )


def _heartbeat_in_one_call(
    database: Session | Engine,
    *,
    instance_name: str,
    now: datetime,
    metrics: dict[str, Any],
    reported_live: list[uuid.UUID],
    secret_digest: str | None,
) -> tuple[InstanceStatus, set[uuid.UUID], set[uuid.UUID]] | None:
    """The heartbeat's one function call, committed; None (nothing written) when ``secret_digest`` does not (or no
    longer) authenticate the host."""
    parameters: dict[str, Any] = {
        "instance_name": instance_name,
        "digest": secret_digest,
        "now": now,
        "metrics": json.dumps(metrics),
        "reported": [str(mid) for mid in reported_live],
    }
    row = _run_heartbeat(database, parameters)
    if row is None:
        return None
    status, dying, still_live = row
    return InstanceStatus(status), {_as_uuid(m) for m in dying or ()}, {_as_uuid(m) for m in still_live or ()}


def _as_uuid(value: Any) -> uuid.UUID:
    # SQLAlchemy's psycopg2 dialect registers psycopg2's UUID caster on its connections; any other gives text.
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


_HEARTBEAT_SETTINGS = {"synchronous_commit": "off"}


def _run_heartbeat(database: Session | Engine, parameters: dict[str, Any]) -> tuple[Any, ...] | None:
    """Call fractal_heartbeat in a transaction of its own; its row, or None (nothing written).

    Given the engine (every app), on a pooled DBAPI connection in one round trip (``run_in_own_transaction``
    without ``commit_if``: the bounds and the call in one implicit transaction, always committed): the call writes
    nothing when it returns no row (the verified form's upsert selects from the authenticated host; the other's
    row always comes back, the instance's foreign key guarantees it), and running it twice (a lost connection's
    retry) writes the same row again. The ORM's and Core's execution layers would cost about 0.2 ms of a 1.2 ms
    heartbeat (bench/profile_heartbeat.py). Given a session (the tests' outer transaction), through its connection.
    """
    if isinstance(database, Engine):
        # synchronous_commit off, for this transaction only: the commit does not wait for its WAL to reach disk.
        # What a Postgres crash can lose is the last few hundred milliseconds of heartbeats (never a torn or
        # half-applied one), and each host sends its next within heartbeat_interval_s: a lost heartbeat costs at
        # most one interval of staleness, well inside host_timeout_s (after which the sweep calls a host LOST).
        # Every other write keeps the default.
        return run_in_own_transaction(database, _HEARTBEAT_CALL, parameters, set_local=_HEARTBEAT_SETTINGS)
    result = database.connection().exec_driver_sql(_HEARTBEAT_CALL, parameters).first()
    if result is None:
        database.rollback()
        return None
    database.commit()
    return tuple(result)


def _heartbeat_portable(
    session: Session, *, instance_name: str, now: datetime, metrics: dict[str, Any], reported_live: list[uuid.UUID]
) -> tuple[InstanceStatus, set[uuid.UUID], set[uuid.UUID]]:
    _upsert_heartbeat(session, instance_name=instance_name, now=now, metrics=metrics)
    status = session.execute(select(Instance.status).where(Instance.instance_name == instance_name)).scalar_one()
    dying = set(
        session.scalars(
            select(Mandelbox.mandelbox_id).where(
                Mandelbox.instance_name == instance_name, Mandelbox.status == MandelboxStatus.DYING
            )
        )
    )
    still_live: set[uuid.UUID] = set()
    if reported_live:
        still_live = set(
            session.scalars(
                select(Mandelbox.mandelbox_id).where(
                    Mandelbox.mandelbox_id.in_(reported_live),
                    Mandelbox.instance_name == instance_name,
                    Mandelbox.status != MandelboxStatus.EXITED,
                )
            )
        )
    return status, dying, still_live


def _upsert_heartbeat(session: Session, *, instance_name: str, now: datetime, metrics: dict[str, Any] | None) -> None:
    # INSERT ... ON CONFLICT DO UPDATE on the heartbeats row only. The FK check on first insert takes KEY SHARE
    # on the instance, which never conflicts with the FOR NO KEY UPDATE locks that assignment holds.
    statement = _heartbeat_upsert(postgres=is_postgres(session), with_metrics=metrics is not None)
    values = {"p_instance_name": instance_name, "p_now": now, "p_metrics": metrics if metrics is not None else {}}
    if session.autoflush:
        session.flush()  # as session.execute would
    statement.execute(session, values)


@functools.cache
def _heartbeat_upsert(*, postgres: bool, with_metrics: bool) -> DriverStatement:
    """The heartbeats row's upsert, built once per dialect and form (run on the driver): without metrics (a
    handshake) a new row gets empty ones and an existing row keeps its own."""
    dialect_insert = postgresql.insert if postgres else sqlite.insert
    statement = dialect_insert(_heartbeats).values(
        instance_name=bindparam("p_instance_name"),
        last_heartbeat_at=bindparam("p_now", type_=_heartbeats.c.last_heartbeat_at.type),
        metrics=bindparam("p_metrics", type_=_heartbeats.c.metrics.type),
    )
    changes = {"last_heartbeat_at": statement.excluded.last_heartbeat_at}
    if with_metrics:
        changes["metrics"] = statement.excluded.metrics
    return DriverStatement(statement.on_conflict_do_update(index_elements=[_heartbeats.c.instance_name], set_=changes))


def get_mandelbox_for_host(session: Session, *, instance_name: str, mandelbox_id: uuid.UUID) -> HostMandelboxView:
    """A mandelbox of this instance, for checking a connecting client; any other id is 404.

    Raises:
        NotFoundError.
    """
    row = session.execute(
        select(Mandelbox.mandelbox_id, Mandelbox.user_id, Mandelbox.session_id, Mandelbox.status).where(
            Mandelbox.mandelbox_id == mandelbox_id, Mandelbox.instance_name == instance_name
        )
    ).first()
    if row is None:
        raise NotFoundError("No such mandelbox on this instance.")
    return HostMandelboxView(
        mandelbox_id=row.mandelbox_id, user_id=row.user_id, session_id=row.session_id, status=row.status
    )


# The mandelbox a host reports on, one of its own: one condition object, so the mover builds its statements once.
_REPORTED_MANDELBOX = (Mandelbox.mandelbox_id == bindparam("report_mandelbox_id")) & (
    Mandelbox.instance_name == bindparam("report_instance_name")
)


def report_mandelbox_status(
    session: Session,
    *,
    instance_name: str,
    mandelbox_id: uuid.UUID,
    status: MandelboxStatus,
    now: datetime | None = None,
) -> HostMandelboxView:
    """Apply a host's status report; EXITED frees the slot at once. Repeating the current status is a no-op.

    Raises:
        NotFoundError: no such mandelbox on this instance.
        InvalidTransitionError: not a move ARCHITECTURE §10 allows (replayed or out-of-order reports).
    """
    current = session.execute(
        select(Mandelbox.status).where(Mandelbox.mandelbox_id == mandelbox_id, Mandelbox.instance_name == instance_name)
    ).scalar_one_or_none()
    if current is None:
        session.rollback()
        raise NotFoundError("No such mandelbox on this instance.")
    if status is not current and status in HOST_REPORTABLE[current]:
        # For EXITED the mover locks this host's instance row first (its slot comes back), then the mandelbox.
        moved = move_mandelboxes(
            session,
            where=_REPORTED_MANDELBOX,
            params={"report_mandelbox_id": mandelbox_id, "report_instance_name": instance_name},
            to=status,
            from_statuses=[source for source, following in HOST_REPORTABLE.items() if status in following],
            # Keeps USER_DELETED when the user asked for this exit; the slot returns in this transaction.
            reason=EndReason.HOST_EXITED if status is MandelboxStatus.EXITED else None,
            actor=_actor(instance_name),
            now=now,
        )
        if moved:
            session.commit()
            log.info(
                "mandelbox_status", mandelbox_id=str(mandelbox_id), previous_status=str(current), status=str(status)
            )
            return get_mandelbox_for_host(session, instance_name=instance_name, mandelbox_id=mandelbox_id)
        # Someone else (a user's delete, a sweep, a concurrent report) moved it first: judge against that.
        current = session.execute(select(Mandelbox.status).where(Mandelbox.mandelbox_id == mandelbox_id)).scalar_one()
    if status is current:
        session.commit()
        return get_mandelbox_for_host(session, instance_name=instance_name, mandelbox_id=mandelbox_id)
    _refuse(
        session,
        instance_name=instance_name,
        action="mandelbox_status",
        error=InvalidTransitionError(
            f"A {current} mandelbox cannot become {status}.", details={"from": str(current), "to": str(status)}
        ),
        detail={"mandelbox_id": str(mandelbox_id), "from": str(current), "to": str(status)},
    )


__all__ = [
    "HandshakeResult",
    "HeartbeatAnswer",
    "HostMandelboxView",
    "get_mandelbox_for_host",
    "handshake_host",
    "record_heartbeat",
    "report_mandelbox_status",
]
