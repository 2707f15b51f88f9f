"""The mandelbox lifecycle: which status may follow which, the one mover, and the live-slot accounting.

    ALLOCATED → CONNECTING → RUNNING → DYING → EXITED, and any live status → EXITED (or → DYING on a user's delete)

Every mandelbox status write goes through ``move_mandelboxes``. Moving to EXITED gives the slot back to the
instance in the same transaction (the live count that the capacity CHECK guards), after locking the instance
rows first (the fleet's lock order, see ``fractal.fleet``).
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Integer,
    Table,
    and_,
    bindparam,
    case,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.base import Executable

from fractal.clock import as_utc, db_now
from fractal.database import DriverStatement, ReusableStatements, in_values, one_of, run_in_own_transaction
from fractal.errors import UserAlreadyActiveError
from fractal.events import EventKind, record_event, record_events
from fractal.fleet.instances import instance_lock
from fractal.models import LIVE_MANDELBOX_STATUSES, EndReason, Instance, InstanceStatus, Mandelbox, MandelboxStatus

__all__ = [
    "HOST_REPORTABLE",
    "LIVE_MANDELBOX_STATUSES",
    "TRANSITIONS",
    "AnswerToStore",
    "FirstChoice",
    "MovedMandelbox",
    "Slot",
    "SlotRequest",
    "StoredAnswerRow",
    "allocate_first_choice",
    "allocate_in_one_statement",
    "allocate_waiting",
    "limit_checked_by_allocate_waiting",
    "live_count_for_user",
    "move_mandelboxes",
    "move_user_mandelbox",
]

# The one table of allowed moves. DYING is where a user's delete (or the host's own report) sends a live box;
# EXITED ends it from anywhere live (the host, a sweep, the instance's termination).
TRANSITIONS: Mapping[MandelboxStatus, frozenset[MandelboxStatus]] = {
    MandelboxStatus.ALLOCATED: frozenset({MandelboxStatus.CONNECTING, MandelboxStatus.DYING, MandelboxStatus.EXITED}),
    MandelboxStatus.CONNECTING: frozenset({MandelboxStatus.RUNNING, MandelboxStatus.DYING, MandelboxStatus.EXITED}),
    MandelboxStatus.RUNNING: frozenset({MandelboxStatus.DYING, MandelboxStatus.EXITED}),
    MandelboxStatus.DYING: frozenset({MandelboxStatus.EXITED}),
    MandelboxStatus.EXITED: frozenset(),
}
# The moves a host may report (ARCHITECTURE §10): the table above less the user's ALLOCATED/CONNECTING → DYING.
HOST_REPORTABLE: Mapping[MandelboxStatus, frozenset[MandelboxStatus]] = {
    MandelboxStatus.ALLOCATED: frozenset({MandelboxStatus.CONNECTING, MandelboxStatus.EXITED}),
    MandelboxStatus.CONNECTING: frozenset({MandelboxStatus.RUNNING, MandelboxStatus.EXITED}),
    MandelboxStatus.RUNNING: frozenset({MandelboxStatus.DYING, MandelboxStatus.EXITED}),
    MandelboxStatus.DYING: frozenset({MandelboxStatus.EXITED}),
    MandelboxStatus.EXITED: frozenset(),
}


@dataclass(frozen=True)
class MovedMandelbox:
    """One row the mover changed."""

    mandelbox_id: uuid.UUID
    instance_name: str
    from_status: MandelboxStatus
    to_status: MandelboxStatus


_instances = cast(Table, Instance.__table__)
_mandelboxes = cast(Table, Mandelbox.__table__)
# The mover's own bind parameters: a caller's ``params`` may not use these names.
_MOVER_PARAMS = frozenset({"move_locked", "move_ids", "move_reason", "move_now", "move_names", "move_freed"})


def move_mandelboxes(
    session: Session,
    *,
    where: ColumnElement[bool],
    to: MandelboxStatus,
    actor: str,
    reason: EndReason | None = None,
    from_statuses: Collection[MandelboxStatus] | None = None,
    event_kind: EventKind = EventKind.MANDELBOX_STATUS,
    detail: dict[str, Any] | None = None,
    skip_locked: bool = False,
    now: datetime | None = None,
    params: Mapping[str, Any] | None = None,
) -> list[MovedMandelbox]:
    """Move every mandelbox matching ``where`` (and whose status may move to ``to``) to ``to``. Flushes only.

    Set-based: a fixed number of statements whatever the number of rows. Each moved row gets one event.

    Args:
        where: which mandelboxes (by id, by instance, ...); rows whose status may not move are left alone.
        reason: the end reason; required for EXITED, where an earlier one (a user's delete) is kept.
        from_statuses: only rows in these statuses (a subset of those the table allows).
        skip_locked: leave rows another transaction holds (sweeps: judged again next pass) instead of waiting.
        now: the time written (tests); the database's clock when None.
        params: the values of bind parameters in ``where`` (names not starting with ``move_``). With them, ``where``
            is a reusable condition: the move's statements are built once per ``where`` object and kept (hot
            callers pass a module-level condition), since building a statement costs more CPU than running it.

    Returns:
        The rows that moved, in mandelbox_id order; repeats are no-ops that return nothing.
    """
    if to is MandelboxStatus.EXITED and reason is None:
        raise ValueError("moving mandelboxes to EXITED needs an end reason")
    allowed = {status for status, following in TRANSITIONS.items() if to in following}
    if from_statuses is not None:
        allowed &= set(from_statuses)
    if not allowed:
        return []
    if params is not None and not _MOVER_PARAMS.isdisjoint(params):
        raise ValueError(f"params may not use the mover's own names {sorted(_MOVER_PARAMS & set(params))}")
    ends = to is MandelboxStatus.EXITED
    # The statements run on the session's connection (Core: nothing is loaded into the session, and the ORM's
    # per-statement work is skipped); what the session holds unflushed is written first, as its autoflush would.
    if session.autoflush:
        session.flush()
    connection = session.connection()
    locks = _locks_rows(connection)
    shape = _MoveShape(to, frozenset(allowed), reason is not None, now is not None, skip_locked, locks)
    if params is None:
        statements = _move_statements(where, shape)
    else:
        statements = _REUSABLE.get((where,), shape, lambda: _move_statements(where, shape).on_driver())
    values: dict[str, Any] = dict(params or {})
    if statements.lock is not None:
        # Lock order: the instances whose slots come back, before their mandelboxes.
        locked = [row[0] for row in _run(connection, statements.lock, values)]
        if not locked:
            return []
        # With skip_locked, boxes whose instance someone else holds wait for a later pass: touching them would
        # mean holding their locks while waiting for the instance, the wrong way round. Without it, the condition
        # keeps out a box that began to match after the instances were locked (its instance is not locked).
        values["move_locked"] = locked
    # Locking re-evaluates the selection on the newest row versions: a row another transaction just moved is
    # either still allowed (and ours now) or no longer matches.
    rows = _run(connection, statements.rows, values)
    if not rows:
        return []
    written: dict[str, Any] = {"move_ids": [row.mandelbox_id for row in rows]}
    if reason is not None:
        written["move_reason"] = reason.value
    if now is not None:
        written["move_now"] = now
    _run(connection, statements.update, written)
    if ends:
        _release_slots(connection, Counter(row.instance_name for row in rows), now=now)
    moved = [MovedMandelbox(row.mandelbox_id, row.instance_name, MandelboxStatus(row.status), to) for row in rows]
    extra = {**(detail or {}), **({"reason": str(reason)} if reason is not None else {})}
    record_events(
        session,
        [
            {
                "kind": event_kind,
                "actor": actor,
                "instance_name": m.instance_name,
                "mandelbox_id": m.mandelbox_id,
                "detail": {"from": str(m.from_status), "to": str(to), **extra},
            }
            for m in moved
        ],
    )
    session.flush()
    return moved


@dataclass(frozen=True)
class _MoveShape:
    """What, besides its condition, decides a move's statements."""

    to: MandelboxStatus
    allowed: frozenset[MandelboxStatus]
    has_reason: bool
    has_now: bool
    skip_locked: bool
    locks_rows: bool  # the database has row locks (see _locks_rows)


def _locks_rows(connection: Connection) -> bool:
    """Whether an end locks its instances first (the fleet's lock order). Not on SQLite: it has no row locks (FOR
    UPDATE is not rendered there) and runs one writer at a time, so that statement would only name the instances of
    the rows the next one reads, at the cost of reading them twice (a fifth of an EXITED report's time there)."""
    return connection.dialect.name != "sqlite"


@dataclass(frozen=True)
class _MoveStatements:
    lock: Executable | DriverStatement | None  # an end's instances (their slots come back), locked in name order
    rows: Executable | DriverStatement  # the rows to move, locked, in mandelbox_id order
    update: Executable | DriverStatement  # the move of the rows read, by id

    def on_driver(self) -> _MoveStatements:
        """The same statements run as DriverStatements (built once and kept: ``params`` given). A caller's condition
        that the driver cannot run (an IN list) leaves them on SQLAlchemy's path."""
        return _MoveStatements(
            None if self.lock is None else DriverStatement(cast(Executable, self.lock), strict=False),
            DriverStatement(cast(Executable, self.rows), strict=False),
            DriverStatement(cast(Executable, self.update), strict=False),
        )


def _run(connection: Connection, statement: Executable | DriverStatement, values: Mapping[str, Any]) -> Sequence[Any]:
    """A mover's statement's rows (none for an UPDATE), whichever way it runs."""
    if isinstance(statement, DriverStatement):
        return statement.execute(connection, values).rows
    result = connection.execute(statement, values)
    return result.all() if result.returns_rows else ()


def _stamp(has_now: bool) -> ColumnElement[Any]:
    """The time a move writes: the caller's ``now`` (a parameter) or the database's clock."""
    return bindparam("move_now", type_=_mandelboxes.c.status_changed_at.type) if has_now else db_now()


def _move_statements(where: ColumnElement[bool], shape: _MoveShape) -> _MoveStatements:
    # "Not EXITED" adds nothing (no move starts from EXITED) but lets SQLite use the live-mandelbox indexes, which
    # are partial on it: without it, a move by instance read every mandelbox ever made (Postgres infers it).
    # The allowed statuses as equalities (one_of), so that the statement can run as a DriverStatement.
    selection = and_(
        where,
        one_of(_mandelboxes.c.status, shape.allowed),
        _mandelboxes.c.status != MandelboxStatus.EXITED,
    )
    lock = None
    chosen = selection
    if shape.to is MandelboxStatus.EXITED and shape.locks_rows:
        # The instances are named by a subquery: one statement reads and locks them (the subquery locks nothing).
        boxes_instances = select(_mandelboxes.c.instance_name).where(selection)
        lock = instance_lock(_instances.c.instance_name.in_(boxes_instances), skip_locked=shape.skip_locked)
        chosen = and_(selection, in_values(_mandelboxes.c.instance_name, "move_locked"))
    rows = (
        select(_mandelboxes.c.mandelbox_id, _mandelboxes.c.instance_name, _mandelboxes.c.status)
        .where(chosen)
        .order_by(_mandelboxes.c.mandelbox_id)
        .with_for_update(skip_locked=shape.skip_locked)
    )
    stamp = _stamp(shape.has_now)
    values: dict[str, Any] = {"status": shape.to, "status_changed_at": stamp}
    if shape.to is MandelboxStatus.EXITED:
        values["ended_at"] = stamp
    if shape.has_reason:
        values["end_reason"] = func.coalesce(_mandelboxes.c.end_reason, bindparam("move_reason"))
    move = update(_mandelboxes).where(in_values(_mandelboxes.c.mandelbox_id, "move_ids")).values(values)
    return _MoveStatements(lock, rows, move)


# Reusable conditions' statements (``params`` given), by the condition object and the move's shape.
_REUSABLE: ReusableStatements[_MoveStatements] = ReusableStatements()


def _release_statement(has_now: bool) -> DriverStatement:
    freed = bindparam("move_freed", type_=Integer)
    live = _instances.c.live_mandelboxes
    return DriverStatement(
        update(_instances)
        .where(in_values(_instances.c.instance_name, "move_names"))
        .values(
            live_mandelboxes=live - freed,
            empty_since=case((live - freed == 0, _stamp(has_now)), else_=_instances.c.empty_since),
        )
    )


_RELEASE_SLOTS = {has_now: _release_statement(has_now) for has_now in (False, True)}


def _release_slots(connection: Connection, freed: Counter[str], *, now: datetime | None) -> None:
    """Give ``freed[name]`` slots back to each instance (the rows are locked already): one statement per distinct
    count of freed slots (one when each instance gets the same number back, the common case)."""
    by_count: defaultdict[int, list[str]] = defaultdict(list)
    for name in sorted(freed):
        if freed[name]:
            by_count[freed[name]].append(name)
    statement = _RELEASE_SLOTS[now is not None]
    for count, names in sorted(by_count.items()):
        values: dict[str, Any] = {"move_names": names, "move_freed": count}
        if now is not None:
            values["move_now"] = now
        statement.execute(connection, values)


# A user's move of one of their own mandelboxes (Postgres), in one statement: lock the row, move it when the table
# allows, record the event, answer the view. A move that ends nothing (DYING: the slot comes back only with the
# host's EXITED report) locks no instance row, so the lock order is not involved.
# - ``target`` locks the user's row (FOR UPDATE, as move_mandelboxes does) and reads its newest version: a
#   concurrent move (the host's EXITED) is waited for, and what the answer shows is what is committed after it.
# - ``moved`` writes only when the locked row's status may move to the target (TRANSITIONS), so a repeat or a
#   move of an ended box changes nothing and records nothing.
# - The answer is built from ``target`` and ``moved`` (the statement's snapshot would show the row before both).
# No row: the user has no such mandelbox (another user's id is indistinguishable from an unknown one).
_MOVE_USER_MANDELBOX = """
WITH target AS (
    SELECT mandelbox_id, instance_name, user_id, session_id, status, created_at, ended_at, end_reason
    FROM mandelboxes WHERE mandelbox_id = %(mandelbox_id)s::uuid AND user_id = %(user_id)s
    FOR UPDATE
), moved AS (
    UPDATE mandelboxes
    SET status = %(to)s, status_changed_at = now(), end_reason = coalesce(mandelboxes.end_reason, %(reason)s)
    FROM target
    WHERE mandelboxes.mandelbox_id = target.mandelbox_id AND target.status = ANY(%(allowed)s)
    RETURNING mandelboxes.mandelbox_id, mandelboxes.instance_name, mandelboxes.status, mandelboxes.end_reason,
              target.status AS from_status
), audited AS (
    INSERT INTO events (created_at, kind, actor, instance_name, mandelbox_id, detail)
    SELECT now(), %(event_kind)s, %(actor)s, moved.instance_name, moved.mandelbox_id,
           jsonb_build_object('from', moved.from_status, 'to', moved.status, 'reason', %(reason)s::text)
    FROM moved
    RETURNING id
)
SELECT target.mandelbox_id, target.instance_name, instances.region, instances.ip, target.user_id,
       target.session_id, coalesce(moved.status, target.status) AS status, target.created_at, target.ended_at,
       coalesce(moved.end_reason, target.end_reason) AS end_reason, moved.from_status
FROM target JOIN instances ON instances.instance_name = target.instance_name LEFT JOIN moved ON true
"""
_USER_MOVE_COLUMNS = (
    "mandelbox_id",
    "instance_name",
    "region",
    "ip",
    "user_id",
    "session_id",
    "status",
    "created_at",
    "ended_at",
    "end_reason",
    "from_status",
)


def move_user_mandelbox(
    session: Session,
    *,
    mandelbox_id: uuid.UUID,
    user_id: str,
    to: MandelboxStatus,
    reason: EndReason,
    actor: str,
    event_kind: EventKind,
) -> dict[str, Any] | None:
    """Postgres, one statement: move ``user_id``'s mandelbox ``mandelbox_id`` to ``to`` when the table allows it
    (else leave it), with its event; the same guarantees as :func:`move_mandelboxes` for one row, for moves that
    end nothing (``to`` is not EXITED: no slot comes back here).

    When ``session`` has not begun and is bound to an engine (every request), it runs in a transaction of its own
    on a pooled connection and commits here (the ORM session's bookkeeping and its statements were most of a
    delete's CPU); otherwise in the session's transaction, which the caller commits.

    Returns:
        The mandelbox's view columns after the move (``from_status`` is None when nothing moved), or None when the
        user has no such mandelbox.
    """
    if to is MandelboxStatus.EXITED:
        raise ValueError("move_user_mandelbox does not give slots back: end mandelboxes with move_mandelboxes")
    allowed = sorted(str(status) for status, following in TRANSITIONS.items() if to in following)
    params: dict[str, Any] = {
        "mandelbox_id": str(mandelbox_id),
        "user_id": user_id,
        "to": str(to),
        "reason": str(reason),
        "allowed": allowed,
        "actor": actor,
        "event_kind": str(event_kind),
    }
    bind = session.get_bind()
    if isinstance(bind, Engine) and not session.in_transaction():
        row = run_in_own_transaction(bind, _MOVE_USER_MANDELBOX, params)
    else:
        found = session.connection().exec_driver_sql(_MOVE_USER_MANDELBOX, params).first()
        row = tuple(found) if found is not None else None
    if row is None:
        return None
    view = dict(zip(_USER_MOVE_COLUMNS, row, strict=True))
    view["created_at"] = as_utc(view["created_at"])
    if view["ended_at"] is not None:
        view["ended_at"] = as_utc(view["ended_at"])
    return view


# Statements of the SQLite allocation path, built once (building a statement costs more CPU than running it on
# SQLite; the compiled form is cached by shape, the values travel as parameters), over the tables' columns: they
# run as plain Core statements, without the ORM's per-statement work (none of them loads or syncs objects); the
# hottest (an assign's take and insert) on the session's connection, skipping the session's execute path too.
# Live is "not EXITED" (LIVE_MANDELBOX_STATUSES is every other status), said so: it is what the partial index
# ix_mandelboxes_live_user is on (SQLite then counts on it instead of the user's whole history), and a plain
# parameter, where an IN list would be expanded into the statement's text at every execution.
assert set(LIVE_MANDELBOX_STATUSES) == set(MandelboxStatus) - {MandelboxStatus.EXITED}
_LIVE_COUNT_FOR_USER = (
    select(func.count())
    .select_from(_mandelboxes)
    .where(_mandelboxes.c.user_id == bindparam("p_user_id"), _mandelboxes.c.status != MandelboxStatus.EXITED)
)


def live_count_for_user(session: Session, user_id: str) -> int:
    """How many live mandelboxes ``user_id`` holds."""
    return int(session.execute(_LIVE_COUNT_FOR_USER, {"p_user_id": user_id}).scalar_one())


# --- allocation: the one place a mandelbox is created and a slot taken -----------------------------------------


@dataclass(frozen=True)
class SlotRequest:
    """A user's mandelbox to place in one region on instances running one client version."""

    mandelbox_id: uuid.UUID
    user_id: str
    session_id: str | None
    region: str
    client_commit_hash: str
    max_per_user: int
    actor: str


@dataclass(frozen=True)
class Slot:
    """Where the new ALLOCATED mandelbox lives."""

    instance_name: str
    ip: str | None
    region: str


# The CTEs both Postgres allocation statements share: count the user's live mandelboxes, pick the fullest ACTIVE
# instance with room, lock it, take a slot, create the mandelbox and its audit event.
# - The caller holds the user's advisory lock, so the count cannot change under the statement (the limit holds).
# - FOR NO KEY UPDATE (not FOR UPDATE): heartbeat rows reference the instance by foreign key and take KEY SHARE,
#   which NO KEY UPDATE does not conflict with, so heartbeats never block or get skipped by assignment.
# - SKIP LOCKED spreads concurrent assigns over candidates instead of queueing them on the fullest one; the room
#   check in WHERE is re-evaluated on the locked, newest row version, so a slot can never be taken twice.
# ``{p}`` formats a parameter's placeholder (``:name`` for text(), ``%(name)s`` at the driver); ``{pick_unless}``
# adds a condition to the pick (the first choice's "no live stored answer").
_SLOT_CTES = """live AS (
    SELECT count(*) AS n FROM mandelboxes WHERE user_id = {user_id} AND status <> 'EXITED'
), candidate AS (
    SELECT instance_name FROM instances
    WHERE region = {region} AND client_commit_hash = {commit} AND status = 'ACTIVE'
      AND live_mandelboxes < mandelbox_capacity
      AND (SELECT n FROM live) < {max_per_user}{pick_unless}
    ORDER BY live_mandelboxes DESC, instance_name
    LIMIT 1
    FOR NO KEY UPDATE SKIP LOCKED
), taken AS (
    UPDATE instances SET live_mandelboxes = instances.live_mandelboxes + 1, empty_since = NULL
    FROM candidate WHERE instances.instance_name = candidate.instance_name
    RETURNING instances.instance_name, instances.ip, instances.region
), created AS (
    INSERT INTO mandelboxes (mandelbox_id, instance_name, user_id, session_id, status,
                             created_at, status_changed_at)
    SELECT CAST({mandelbox_id} AS uuid), taken.instance_name, {user_id}, {session_id}, 'ALLOCATED', now(), now()
    FROM taken
    RETURNING mandelbox_id
), audited AS (
    INSERT INTO events (created_at, kind, actor, instance_name, mandelbox_id, detail)
    SELECT now(), {event_kind}, {actor}, taken.instance_name, CAST({mandelbox_id} AS uuid),
           jsonb_build_object('region', taken.region, 'client_commit_hash', CAST({commit} AS text))
    FROM taken
    RETURNING id
)"""
_SLOT_PARAMETERS = ("user_id", "region", "commit", "max_per_user", "mandelbox_id", "session_id", "event_kind", "actor")


def _slot_ctes(placeholder: str, *, pick_unless: str = "") -> str:
    """_SLOT_CTES with each parameter written as ``placeholder`` formats its name."""
    names = {name: placeholder.format(name) for name in _SLOT_PARAMETERS}
    return _SLOT_CTES.format(pick_unless=pick_unless, **names)


# Postgres fast path, one round trip: the shared CTEs, all in one statement. The answer is always one row: the live
# count, and the instance when a slot was taken (else NULLs).
_ALLOCATE_ANSWER = """
SELECT (SELECT n FROM live) AS live_count, taken.instance_name, taken.ip, taken.region
FROM (SELECT 1) AS one LEFT JOIN taken ON true
"""
_ALLOCATE_SKIP_LOCKED = text("WITH " + _slot_ctes(":{}") + _ALLOCATE_ANSWER)


# The same, preceded by the user's advisory lock in the same round trip: two statements in one query run in
# order, and under READ COMMITTED the second takes its snapshot after the first returned (the lock granted), so
# its live count sees every assign of this user committed before.
_LOCK_THEN_ALLOCATE = text("SELECT pg_advisory_xact_lock(:user_lock_key);\n" + str(_ALLOCATE_SKIP_LOCKED))


def allocate_in_one_statement(
    session: Session, wanted: SlotRequest, *, user_lock_key: int | None = None
) -> Slot | None:
    """Postgres: take a slot and create the ALLOCATED mandelbox in one statement; None when no instance has room.

    The caller holds the user's advisory lock (so the live count cannot change under this statement), or passes
    its key as ``user_lock_key`` to have it taken first in the same round trip.

    Raises:
        UserAlreadyActiveError: the user already holds ``max_per_user`` live mandelboxes.
    """
    statement = _ALLOCATE_SKIP_LOCKED if user_lock_key is None else _LOCK_THEN_ALLOCATE
    lock = {} if user_lock_key is None else {"user_lock_key": user_lock_key}
    row = session.execute(
        statement,
        {
            **lock,
            "region": wanted.region,
            "commit": wanted.client_commit_hash,
            "mandelbox_id": str(wanted.mandelbox_id),
            "user_id": wanted.user_id,
            "session_id": wanted.session_id,
            "max_per_user": wanted.max_per_user,
            "actor": wanted.actor,
            "event_kind": str(EventKind.MANDELBOX_ASSIGNED),
        },
    ).one()
    if row.live_count >= wanted.max_per_user:
        raise UserAlreadyActiveError(details={"max_mandelboxes_per_user": wanted.max_per_user})
    if row.instance_name is None:
        return None
    return Slot(row.instance_name, row.ip, row.region)


@dataclass(frozen=True)
class AnswerToStore:
    """An Idempotency-Key whose stored answer the allocation reads and, when it takes a slot, writes."""

    key: str
    request_hash: str
    ttl_s: int
    response_status: int
    purge_batch: int


@dataclass(frozen=True)
class StoredAnswerRow:
    """What an Idempotency-Key held when the statement began (judged on the database's clock)."""

    request_hash: str
    response_body: dict[str, Any]
    expired: bool


@dataclass(frozen=True)
class FirstChoice:
    """The answer of :func:`allocate_first_choice`: the user's live count before it, the slot taken (None: none
    had room, or the key holds a live answer, or the user is at the limit), the key's stored answer (None: none),
    and whether it ran in a transaction of its own, over already (committed with the slot, else rolled back).
    Without a slot: whether the region had room (committed rows, locked or not) on the commit, and on another."""

    live_count: int
    slot: Slot | None
    stored: StoredAnswerRow | None
    own_transaction: bool = False
    room: bool = True
    other_room: bool = False


# The whole assign in one round trip (Postgres): the user's advisory lock, then one statement that reads the
# Idempotency-Key's stored answer, counts the user's live mandelboxes, picks and locks the fullest instance with
# room (as _ALLOCATE_SKIP_LOCKED), takes the slot, creates the mandelbox and its audit event and, with a key,
# stores the answer (replacing an expired one) and purges a bounded batch of other expired keys.
# - Nothing is written when the key holds a live answer (a replay, or a reuse with another body) or the user is
#   at the limit: the pick's WHERE is false, so taken is empty and every write below it selects from nothing.
# - The two statements run in order in one query; under READ COMMITTED the second takes its snapshot after the
#   lock was granted, so it sees every assign of this user committed before (count and stored answer alike).
# - Sub-statements of one statement must not modify one row twice: the purge leaves this request's own key to the
#   upsert (ON CONFLICT ... WHERE expired), so an expired answer of ours is replaced exactly once.
# - The answer stored is the JSON the view sends (Assignment.to_body: the same keys and values).
# When no slot was taken, the answer also says whether the region has room on instances running the commit
# (``room``: false means even waiting for locked ones is pointless) and on instances running another one
# (``other_room``: the refusal is then COMMIT_HASH_MISMATCH). Both read committed rows without locking; CASE runs
# them only when nothing was taken.
_FIRST_CHOICE_ANSWER = """
SELECT (SELECT n FROM live) AS live_count, taken.instance_name, taken.ip, taken.region,
       stored.request_hash, stored.response_body, stored.expired,
       CASE WHEN taken.instance_name IS NULL THEN EXISTS (
           SELECT 1 FROM instances WHERE region = %(region)s AND client_commit_hash = %(commit)s
             AND status = 'ACTIVE' AND live_mandelboxes < mandelbox_capacity) END AS room,
       CASE WHEN taken.instance_name IS NULL THEN EXISTS (
           SELECT 1 FROM instances WHERE region = %(region)s AND client_commit_hash <> %(commit)s
             AND status = 'ACTIVE' AND live_mandelboxes < mandelbox_capacity) END AS other_room
FROM (SELECT 1) AS one LEFT JOIN taken ON true LEFT JOIN stored ON true
"""


def _first_choice_sql(*, stored: str, answer_ctes: str) -> str:
    pick_unless = "\n      AND NOT EXISTS (SELECT 1 FROM stored WHERE NOT stored.expired)"
    return (
        "\nSELECT pg_advisory_xact_lock(%(user_lock_key)s);\nWITH stored AS (\n    "
        + stored
        + "\n), "
        + _slot_ctes("%({})s", pick_unless=pick_unless)
        + answer_ctes
        + _FIRST_CHOICE_ANSWER
    )


_NO_STORED_ANSWER = "SELECT NULL::text AS request_hash, NULL::jsonb AS response_body, false AS expired WHERE false"
_STORED_ANSWER = """SELECT request_hash, response_body, expires_at <= now() AS expired
    FROM idempotency_keys WHERE user_id = %(user_id)s AND key = %(answer_key)s"""
_ANSWER_CTES = """, kept AS (
    INSERT INTO idempotency_keys (user_id, key, request_hash, response_status, response_body, mandelbox_id,
                                  created_at, expires_at)
    SELECT %(user_id)s, %(answer_key)s, %(request_hash)s, %(response_status)s,
           jsonb_build_object('mandelbox_id', %(mandelbox_id)s::text, 'ip', taken.ip, 'region', taken.region,
                              'instance_name', taken.instance_name, 'status', 'ALLOCATED'),
           %(mandelbox_id)s::uuid, now(), now() + make_interval(secs => %(ttl_s)s)
    FROM taken
    ON CONFLICT (user_id, key) DO UPDATE
        SET request_hash = EXCLUDED.request_hash, response_status = EXCLUDED.response_status,
            response_body = EXCLUDED.response_body, mandelbox_id = EXCLUDED.mandelbox_id,
            created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
        WHERE idempotency_keys.expires_at <= now()
    RETURNING key
), purged AS (
    DELETE FROM idempotency_keys
    WHERE (user_id, key) IN (
        SELECT user_id, key FROM idempotency_keys
        WHERE expires_at <= now() AND NOT (user_id = %(user_id)s AND key = %(answer_key)s)
          AND EXISTS (SELECT 1 FROM taken)
        LIMIT %(purge_batch)s
        FOR UPDATE SKIP LOCKED
    ) AND expires_at <= now()
    RETURNING key
)"""
_FIRST_CHOICE_PLAIN = _first_choice_sql(stored=_NO_STORED_ANSWER, answer_ctes="")
_FIRST_CHOICE_WITH_ANSWER = _first_choice_sql(stored=_STORED_ANSWER, answer_ctes=_ANSWER_CTES)

# Sent as text, the statement above is parsed and planned on every assign: about 40% of its backend CPU (a prepared
# plan measured 0.5-0.8 ms cheaper per call). So it runs inside a PL/pgSQL function, which keeps its plans for the
# connection's life (and works behind PgBouncer's transaction pooling, unlike PREPARE). Under READ COMMITTED a
# VOLATILE function's every statement takes a fresh snapshot, so the query after the lock sees every assign of this
# user committed before, as in the two-statement text. The function is created by a migration, frozen text:
# first_choice_function_sql() builds it from the statements here, and a test checks the migrated body is that.
FIRST_CHOICE_FUNCTION = "fractal_first_choice"
_FIRST_CHOICE_ARGS = (
    ("user_lock_key", "bigint"),
    ("user_id", "text"),
    ("region", "text"),
    ("commit", "text"),
    ("max_per_user", "integer"),
    ("mandelbox_id", "text"),
    ("session_id", "text"),
    ("event_kind", "text"),
    ("actor", "text"),
    ("answer_key", "text"),
    ("request_hash", "text"),
    ("response_status", "integer"),
    ("ttl_s", "integer"),
    ("purge_batch", "integer"),
)
_FIRST_CHOICE_RESULT = (
    "live_count bigint, instance_name text, ip text, region text, request_hash text, response_body jsonb, "
    "expired boolean, room boolean, other_room boolean"
)
# The arguments in _FIRST_CHOICE_ARGS's order (checked at import).
_FIRST_CHOICE_CALL = (
    "SELECT * FROM fractal_first_choice(%(user_lock_key)s, %(user_id)s, %(region)s, %(commit)s, %(max_per_user)s,"
    " %(mandelbox_id)s, %(session_id)s, %(event_kind)s, %(actor)s, %(answer_key)s, %(request_hash)s,"
    " %(response_status)s, %(ttl_s)s, %(purge_batch)s)"
)
assert FIRST_CHOICE_FUNCTION + "(" in _FIRST_CHOICE_CALL
assert _FIRST_CHOICE_CALL.count("%(") == len(_FIRST_CHOICE_ARGS)
assert all(f"%({name})s" in _FIRST_CHOICE_CALL for name, _ in _FIRST_CHOICE_ARGS)


def _function_query(sql: str) -> str:
    """A first-choice statement as the function's query: after the lock, arguments for placeholders, the answer's
    columns cast to the declared result types."""
    query = sql.partition(";")[2].strip()
    for name, _ in _FIRST_CHOICE_ARGS:
        query = query.replace(f"%({name})s", f"p_{name}")
    query = query.replace(
        "taken.instance_name, taken.ip, taken.region,\n       stored.request_hash,",
        "taken.instance_name::text, taken.ip::text, taken.region::text,\n       stored.request_hash::text,",
    )
    assert "%(" not in query, query
    return query


def first_choice_function_body() -> str:
    """The PL/pgSQL body of fractal_first_choice (what pg_proc.prosrc holds once migrated)."""
    return (
        "\n#variable_conflict use_column\nBEGIN\n    PERFORM pg_advisory_xact_lock(p_user_lock_key);\n"
        "    IF p_answer_key IS NULL THEN\n        RETURN QUERY "
        + _function_query(_FIRST_CHOICE_PLAIN)
        + ";\n    ELSE\n        RETURN QUERY "
        + _function_query(_FIRST_CHOICE_WITH_ANSWER)
        + ";\n    END IF;\nEND\n"
    )


def first_choice_function_sql() -> str:
    """CREATE OR REPLACE FUNCTION fractal_first_choice: what the migration that created it ran."""
    arguments = ", ".join(f"p_{name} {kind}" for name, kind in _FIRST_CHOICE_ARGS)
    return (
        f"CREATE OR REPLACE FUNCTION {FIRST_CHOICE_FUNCTION}({arguments})\n"
        f"RETURNS TABLE ({_FIRST_CHOICE_RESULT})\nLANGUAGE plpgsql VOLATILE AS $fn$"
        + first_choice_function_body()
        + "$fn$"
    )


def allocate_first_choice(
    session: Session, wanted: SlotRequest, *, user_lock_key: int, answer: AnswerToStore | None = None
) -> FirstChoice:
    """Postgres, one round trip: take the user's lock, then (one statement) read ``answer``'s stored answer, count
    the user's live mandelboxes and, when the key holds no live answer and the user is under the limit, take a slot
    in ``wanted.region`` (skipping locked instances) with the mandelbox, its audit event and the stored answer.

    The statement is fixed text with named parameters: it runs at the driver, SQLAlchemy's compile and result
    machinery would only cost CPU. When ``session`` has not begun and is bound to an engine (every request), it
    runs on a pooled connection of its own, in a transaction of its own that ends here, without the ORM session's
    transaction bookkeeping (most of an assign's Postgres CPU in the worker): ``run_in_own_transaction`` opens it
    with the transaction bounds in the same round trip, and it commits when a slot was taken, else rolls back
    (nothing was written; the user's lock is released). Otherwise (a transaction already begun, a session on a
    connection) it runs in the session's transaction, which the caller continues. Driver errors are raised as
    SQLAlchemy's, as on the session.
    """
    params: dict[str, Any] = {
        "answer_key": None,
        "request_hash": None,
        "response_status": None,
        "ttl_s": None,
        "purge_batch": None,
        "user_lock_key": user_lock_key,
        "region": wanted.region,
        "commit": wanted.client_commit_hash,
        "mandelbox_id": str(wanted.mandelbox_id),
        "user_id": wanted.user_id,
        "session_id": wanted.session_id,
        "max_per_user": wanted.max_per_user,
        "actor": wanted.actor,
        "event_kind": str(EventKind.MANDELBOX_ASSIGNED),
    }
    if answer is not None:
        params.update(
            answer_key=answer.key,
            request_hash=answer.request_hash,
            response_status=answer.response_status,
            ttl_s=answer.ttl_s,
            purge_batch=answer.purge_batch,
        )
    sql = _FIRST_CHOICE_CALL
    bind = session.get_bind()
    own = isinstance(bind, Engine) and not session.in_transaction()
    if isinstance(bind, Engine) and own:
        # The statement answers one row, always; it commits when it took a slot (else nothing was written).
        found = run_in_own_transaction(bind, sql, params, commit_if=_took_slot)
        if found is None:  # the function returns exactly one row; none means the migrated function is not ours
            raise RuntimeError(f"{FIRST_CHOICE_FUNCTION} answered no row")
        row = found
    else:
        row = tuple(session.connection().exec_driver_sql(sql, params).one())
    live_count, instance_name, ip, region, request_hash, response_body, expired, room, other_room = row
    slot = Slot(instance_name, ip, region) if instance_name is not None else None
    stored = StoredAnswerRow(request_hash, response_body, bool(expired)) if request_hash is not None else None
    return FirstChoice(
        int(live_count), slot, stored, own_transaction=own, room=room is not False, other_room=bool(other_room)
    )


def _took_slot(row: tuple[Any, ...] | None) -> bool:
    return row is not None and row[1] is not None


_WAITING_CANDIDATES = (
    select(_instances.c.instance_name)
    .where(
        _instances.c.region == bindparam("p_region"),
        _instances.c.client_commit_hash == bindparam("p_commit"),
        _instances.c.status == InstanceStatus.ACTIVE,
        _instances.c.live_mandelboxes < _instances.c.mandelbox_capacity,
    )
    .order_by(_instances.c.live_mandelboxes.desc(), _instances.c.instance_name)
)
_TAKE_SLOT = (
    update(_instances)
    .where(
        _instances.c.instance_name == bindparam("p_name"),
        _instances.c.status == InstanceStatus.ACTIVE,
        _instances.c.live_mandelboxes < _instances.c.mandelbox_capacity,
    )
    .values(live_mandelboxes=_instances.c.live_mandelboxes + 1, empty_since=None)
    .returning(_instances.c.instance_name, _instances.c.ip, _instances.c.region)
)
_CREATE_ALLOCATED = DriverStatement(
    insert(_mandelboxes).values(
        mandelbox_id=bindparam("p_mandelbox_id", type_=_mandelboxes.c.mandelbox_id.type),
        instance_name=bindparam("p_name"),
        user_id=bindparam("p_user_id"),
        session_id=bindparam("p_session_id"),
        status=MandelboxStatus.ALLOCATED,
        created_at=db_now(),
        status_changed_at=db_now(),
    )
)


# SQLite: the fullest candidate picked and its slot taken in one statement (SQLite runs one writer at a time, so
# nothing can take the slot between the pick and the take; the guard is kept all the same), and only while the
# user holds fewer than ``p_max_per_user`` live mandelboxes (the limit checked in the statement that takes the slot).
# Written as SQL for one reason: the pick's index. Its "status = 'ACTIVE'" makes both ix_instances_status and the
# partial ix_instances_assignable usable, and SQLite, without statistics, plans on the first: every ACTIVE host of
# every region read and sorted, which at a busy hour (a thousand ACTIVE hosts) was most of an assign's CPU. INDEXED
# BY pins the partial index (its condition written literally, so that the index is usable when the statement is
# prepared); the live count reads ix_mandelboxes_live_user the same way. Same rows, same order as _WAITING_CANDIDATES.
_TAKE_FULLEST_SLOT = DriverStatement(
    text(
        """
UPDATE instances SET live_mandelboxes = live_mandelboxes + 1, empty_since = NULL
WHERE instance_name = (
    SELECT instance_name FROM instances INDEXED BY ix_instances_assignable
    WHERE region = :p_region AND client_commit_hash = :p_commit AND status = 'ACTIVE'
      AND live_mandelboxes < mandelbox_capacity
    ORDER BY live_mandelboxes DESC, instance_name
    LIMIT 1
)
  AND status = 'ACTIVE' AND live_mandelboxes < mandelbox_capacity
  AND (SELECT count(*) FROM mandelboxes WHERE user_id = :p_user_id AND status <> 'EXITED') < :p_max_per_user
RETURNING instance_name, ip, region
"""
    )
)


def limit_checked_by_allocate_waiting(session: Session) -> bool:
    """Whether ``allocate_waiting`` checks the per-user limit itself (SQLite), so that the caller need not count
    the user's live mandelboxes before it (only after, when it took no slot)."""
    return session.get_bind().dialect.name == "sqlite"


def allocate_waiting(session: Session, wanted: SlotRequest) -> Slot | None:
    """Wait for candidates one row at a time; the only path on SQLite (the development default).

    Every candidate may be locked by concurrent assigns whose commits can still leave room. A guarded UPDATE
    waits for the row lock and re-checks status and room on the newest version; holding at most one instance
    lock at a time means two assigns can never deadlock (a multi-row blocking FOR UPDATE could). On SQLite, whose
    writers take turns, the pick and the take are one statement: the same fullest candidate, one round trip; it
    also checks ``wanted.max_per_user`` (None too when the user holds that many live mandelboxes already: the
    caller counts them to tell which, see ``limit_checked_by_allocate_waiting``). Elsewhere the caller checks the
    limit first.
    """
    if limit_checked_by_allocate_waiting(session):
        params = {
            "p_region": wanted.region,
            "p_commit": wanted.client_commit_hash,
            "p_user_id": wanted.user_id,
            "p_max_per_user": wanted.max_per_user,
        }
        taken = _TAKE_FULLEST_SLOT.execute(session, params).first()
        return None if taken is None else _create_allocated(session, wanted, taken)
    candidates = session.scalars(
        _WAITING_CANDIDATES, {"p_region": wanted.region, "p_commit": wanted.client_commit_hash}
    ).all()
    for name in candidates:
        taken = session.execute(_TAKE_SLOT, {"p_name": name}).first()
        if taken is not None:
            return _create_allocated(session, wanted, taken)
    return None


def _create_allocated(session: Session, wanted: SlotRequest, taken: Any) -> Slot:
    """The ALLOCATED mandelbox on the instance whose slot ``taken`` (a _TAKE_SLOT row) is, and its event."""
    _CREATE_ALLOCATED.execute(
        session,
        {
            "p_mandelbox_id": wanted.mandelbox_id,
            "p_name": taken.instance_name,
            "p_user_id": wanted.user_id,
            "p_session_id": wanted.session_id,
        },
    )
    record_event(
        session,
        kind=EventKind.MANDELBOX_ASSIGNED,
        actor=wanted.actor,
        instance_name=taken.instance_name,
        mandelbox_id=wanted.mandelbox_id,
        detail={"region": taken.region, "client_commit_hash": wanted.client_commit_hash},
    )
    return Slot(taken.instance_name, taken.ip, taken.region)
