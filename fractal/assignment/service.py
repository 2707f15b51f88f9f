"""Mandelbox assignment: the one place capacity is handed to users.

Correctness rests on Postgres, not on the application: the chosen instance row is locked while its live
count is raised, a CHECK constraint makes ``live_mandelboxes > mandelbox_capacity`` impossible, and a
per-user advisory lock serialises one user's concurrent assigns so the per-user limit holds.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, Select, delete, insert, select, text, tuple_, update
from sqlalchemy.orm import Session

from fractal.cache import DataCache
from fractal.clock import utcnow
from fractal.database import advisory_xact_lock, is_postgres
from fractal.errors import (
    CommitHashMismatchError,
    FractalError,
    IdempotencyKeyReusedError,
    NoInstanceAvailableError,
    NotFoundError,
    RegionNotEnabledError,
    UserAlreadyActiveError,
)
from fractal.events import EventKind, record_event
from fractal.images import active_image_summary
from fractal.lifecycle import live_count_for_user
from fractal.models import EndReason, IdempotencyKey, Instance, InstanceStatus, Mandelbox, MandelboxStatus

LOCAL_DEV_COMMIT_HASH = "local_dev"
NO_CAPACITY_RETRY_AFTER_S = 10
# Only successful assigns are remembered under an Idempotency-Key; the view answers them 201 Created.
# Refusals (409/422/503) are not stored: a retried refusal is evaluated again, since the state that caused
# it (the user's live mandelboxes, enabled regions, free capacity) may have changed, and nothing was created.
IDEMPOTENT_SUCCESS_STATUS = 201
DEFAULT_IDEMPOTENCY_TTL_S = 24 * 3600
# Expired keys are purged opportunistically, a bounded batch whenever a new key is stored.
IDEMPOTENCY_PURGE_BATCH = 100

# Postgres fast path, one round trip: count the user's live mandelboxes, pick the fullest ACTIVE instance with
# room, lock it, take a slot, create the mandelbox and its audit event, all in one statement.
# - The caller holds the user's advisory lock, so the count cannot change under this statement (the limit holds).
# - FOR NO KEY UPDATE (not FOR UPDATE): heartbeat rows reference the instance by foreign key and take KEY SHARE,
#   which NO KEY UPDATE does not conflict with, so heartbeats never block or get skipped by assignment.
# - SKIP LOCKED spreads concurrent assigns over candidates instead of queueing them on the fullest one; the room
#   check in WHERE is re-evaluated on the locked, newest row version, so a slot can never be taken twice.
# The answer is always one row: the live count, and the instance when a slot was taken (else NULLs).
_ASSIGN_SKIP_LOCKED = text(
    """
WITH live AS (
    SELECT count(*) AS n FROM mandelboxes WHERE user_id = :user_id AND status <> 'EXITED'
), candidate AS (
    SELECT instance_name FROM instances
    WHERE region = :region AND client_commit_hash = :commit AND status = 'ACTIVE'
      AND live_mandelboxes < mandelbox_capacity
      AND (SELECT n FROM live) < :max_per_user
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
    SELECT :mandelbox_id, taken.instance_name, :user_id, :session_id, 'ALLOCATED', :now, :now FROM taken
    RETURNING mandelbox_id
), audited AS (
    INSERT INTO events (created_at, kind, actor, instance_name, mandelbox_id, detail)
    SELECT :now, :event_kind, :actor, taken.instance_name, :mandelbox_id,
           jsonb_build_object('region', taken.region, 'client_commit_hash', CAST(:commit AS text))
    FROM taken
    RETURNING id
)
SELECT (SELECT n FROM live) AS live_count, taken.instance_name, taken.ip, taken.region
FROM (SELECT 1) AS one LEFT JOIN taken ON true
"""
)


@dataclass(frozen=True)
class Assignment:
    mandelbox_id: uuid.UUID
    instance_name: str
    ip: str | None
    region: str
    status: MandelboxStatus

    def to_body(self) -> dict[str, Any]:
        """The JSON answer of a successful assign (also what an Idempotency-Key replays)."""
        return {
            "mandelbox_id": str(self.mandelbox_id),
            "ip": self.ip,
            "region": self.region,
            "instance_name": self.instance_name,
            "status": str(self.status),
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Assignment:
        return cls(
            mandelbox_id=uuid.UUID(body["mandelbox_id"]),
            instance_name=body["instance_name"],
            ip=body["ip"],
            region=body["region"],
            status=MandelboxStatus(body["status"]),
        )


@dataclass(frozen=True)
class AssignResult:
    """An assignment, and whether it is the stored answer to an earlier request with the same key."""

    assignment: Assignment
    replayed: bool = False


@dataclass(frozen=True)
class IdempotencyRequest:
    """An Idempotency-Key and the fingerprint of the request body it was sent with."""

    key: str
    request_hash: str
    ttl_s: int = DEFAULT_IDEMPOTENCY_TTL_S


def request_fingerprint(*, regions: Sequence[str], client_commit_hash: str, session_id: str | None) -> str:
    """sha256 of the canonical assign body: a key reused with another body is refused."""
    canonical = json.dumps(
        {"regions": list(regions), "client_commit_hash": client_commit_hash, "session_id": session_id},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class MandelboxView:
    mandelbox_id: uuid.UUID
    instance_name: str
    region: str
    ip: str | None
    user_id: str
    session_id: str | None
    status: MandelboxStatus
    created_at: datetime
    ended_at: datetime | None
    end_reason: EndReason | None


def assign_mandelbox(
    session: Session,
    *,
    user_id: str,
    regions: Sequence[str],
    client_commit_hash: str,
    session_id: str | None = None,
    max_per_user: int = 1,
    allow_local_dev: bool = False,
    on_no_capacity: Callable[[Sequence[str], str], None] | None = None,
    idempotency_key: str | None = None,
    idempotency_ttl_s: int = DEFAULT_IDEMPOTENCY_TTL_S,
    cache: DataCache | None = None,
) -> AssignResult:
    """Give ``user_id`` a mandelbox on the fullest suitable instance of the first region with room.

    Args:
        regions: requested regions, nearest first; unknown or disabled ones are skipped.
        client_commit_hash: the client's version; only instances running exactly it qualify
            (``local_dev`` means each region's newest active image when ``allow_local_dev``).
        on_no_capacity: called with (regions, commit) when nothing had room, e.g. to wake the scaler.
        idempotency_key: the request's Idempotency-Key; a success is stored under it (with a fingerprint of
            the request, for ``idempotency_ttl_s``) in the same transaction as the mandelbox, and a later
            request with that key (from any replica) gets the same answer.
        cache: where the enabled regions / newest images are read from (the database when None).

    Returns:
        The new ALLOCATED mandelbox and where to connect, or the stored first answer for a repeated key.

    Raises:
        UserAlreadyActiveError, RegionNotEnabledError, CommitHashMismatchError, NoInstanceAvailableError,
        IdempotencyKeyReusedError (the key was used with a different body and has not expired).
    """
    idempotency = None
    if idempotency_key is not None:
        fingerprint = request_fingerprint(regions=regions, client_commit_hash=client_commit_hash, session_id=session_id)
        idempotency = IdempotencyRequest(key=idempotency_key, request_hash=fingerprint, ttl_s=idempotency_ttl_s)
    try:
        result = _assign_in_transaction(
            session,
            user_id=user_id,
            regions=regions,
            client_commit_hash=client_commit_hash,
            session_id=session_id,
            max_per_user=max_per_user,
            allow_local_dev=allow_local_dev,
            idempotency=idempotency,
            cache=cache,
        )
    except FractalError as refusal:
        session.rollback()
        _record_refusal(session, user_id=user_id, regions=regions, commit=client_commit_hash, error=refusal)
        if isinstance(refusal, NoInstanceAvailableError) and on_no_capacity is not None:
            on_no_capacity(regions, client_commit_hash)
        raise
    session.commit()
    return result


def _assign_in_transaction(
    session: Session,
    *,
    user_id: str,
    regions: Sequence[str],
    client_commit_hash: str,
    session_id: str | None,
    max_per_user: int,
    allow_local_dev: bool,
    idempotency: IdempotencyRequest | None,
    cache: DataCache | None,
) -> AssignResult:
    # Serialise this user's assigns so that counting live mandelboxes and adding one is atomic, and so that
    # concurrent retries with one Idempotency-Key queue here: the first stores its answer and commits, the
    # others then find it (each statement under READ COMMITTED sees rows committed before it began).
    advisory_xact_lock(session, f"fractal:user:{user_id}")
    if idempotency is not None:
        stored = _stored_answer(session, user_id=user_id, idempotency=idempotency)
        if stored is not None:
            return AssignResult(stored, replayed=True)

    summary = active_image_summary(session, cache=cache)
    enabled = set(summary["regions"])
    candidates = list(dict.fromkeys(region for region in regions if region in enabled))
    if not candidates:
        raise RegionNotEnabledError(details={"regions": list(regions)})

    use_newest = allow_local_dev and client_commit_hash == LOCAL_DEV_COMMIT_HASH
    newest: dict[str, str] = dict(summary["newest"]) if use_newest else {}
    mandelbox_id = uuid.uuid4()
    actor = f"user:{user_id}"
    fast = is_postgres(session)
    if not fast and live_count_for_user(session, user_id) >= max_per_user:
        raise UserAlreadyActiveError(details={"max_mandelboxes_per_user": max_per_user})
    for region in candidates:
        commit = newest.get(region, client_commit_hash)
        params = {
            "region": region,
            "commit": commit,
            "mandelbox_id": mandelbox_id,
            "user_id": user_id,
            "session_id": session_id,
            "now": utcnow(),
            "max_per_user": max_per_user,
            "actor": actor,
            "event_kind": str(EventKind.MANDELBOX_ASSIGNED),
        }
        # A nearer region whose candidates are merely locked by concurrent assigns is waited for before a
        # farther one is tried: region order is the user's preference.
        row = (_take_slot_fast(session, params) if fast else None) or _take_slot_waiting(session, params)
        if row is None:
            continue
        assignment = Assignment(
            mandelbox_id=mandelbox_id, instance_name=row[0], ip=row[1], region=row[2], status=MandelboxStatus.ALLOCATED
        )
        if idempotency is not None:
            _store_answer(session, user_id=user_id, idempotency=idempotency, assignment=assignment)
        return AssignResult(assignment)

    if _other_versions_have_room(session, candidates, client_commit_hash, newest):
        raise CommitHashMismatchError(details={"client_commit_hash": client_commit_hash})
    raise NoInstanceAvailableError(retry_after_s=NO_CAPACITY_RETRY_AFTER_S)


def _stored_answer(session: Session, *, user_id: str, idempotency: IdempotencyRequest) -> Assignment | None:
    """The answer stored under this user's key, None if there is none (an expired one is dropped).

    Raises:
        IdempotencyKeyReusedError: the key is live but was sent with a different body.
    """
    row = session.get(IdempotencyKey, (user_id, idempotency.key), populate_existing=True)
    if row is None:
        return None
    if row.expires_at <= utcnow():
        session.delete(row)
        session.flush()
        return None
    if row.request_hash != idempotency.request_hash:
        raise IdempotencyKeyReusedError()
    return Assignment.from_body(row.response_body)


def _store_answer(session: Session, *, user_id: str, idempotency: IdempotencyRequest, assignment: Assignment) -> None:
    now = utcnow()
    session.execute(
        insert(IdempotencyKey).values(
            user_id=user_id,
            key=idempotency.key,
            request_hash=idempotency.request_hash,
            response_status=IDEMPOTENT_SUCCESS_STATUS,
            response_body=assignment.to_body(),
            mandelbox_id=assignment.mandelbox_id,
            created_at=now,
            expires_at=now + timedelta(seconds=idempotency.ttl_s),
        )
    )
    _purge_expired_keys(session, now=now)


def _purge_expired_keys(session: Session, *, now: datetime) -> None:
    """Delete a bounded batch of expired keys (any user's); a key replaced meanwhile is a newer row, kept."""
    expired = (
        select(IdempotencyKey.user_id, IdempotencyKey.key)
        .where(IdempotencyKey.expires_at <= now)
        .limit(IDEMPOTENCY_PURGE_BATCH)
    )
    if is_postgres(session):
        # Rows another transaction is replacing right now are skipped, never waited for.
        expired = expired.with_for_update(skip_locked=True)
    session.execute(
        delete(IdempotencyKey)
        .where(tuple_(IdempotencyKey.user_id, IdempotencyKey.key).in_(expired), IdempotencyKey.expires_at <= now)
        .execution_options(synchronize_session=False)
    )


def _take_slot_fast(session: Session, params: dict[str, Any]) -> tuple[str, str | None, str] | None:
    """The one-statement path; raises UserAlreadyActiveError when the user is at the limit."""
    row = session.execute(_ASSIGN_SKIP_LOCKED, params).one()
    if row.live_count >= params["max_per_user"]:
        raise UserAlreadyActiveError(details={"max_mandelboxes_per_user": params["max_per_user"]})
    if row.instance_name is None:
        return None
    return (row.instance_name, row.ip, row.region)


def _take_slot_waiting(session: Session, params: dict[str, Any]) -> tuple[str, str | None, str] | None:
    """Wait for candidates one row at a time; the only path on SQLite (the development default).

    Every candidate may be locked by concurrent assigns whose commits can still leave room. A guarded UPDATE
    waits for the row lock and re-checks status and room on the newest version; holding at most one instance
    lock at a time means two assigns can never deadlock (a multi-row blocking FOR UPDATE could).
    """
    candidates = session.scalars(
        select(Instance.instance_name)
        .where(
            Instance.region == params["region"],
            Instance.client_commit_hash == params["commit"],
            Instance.status == InstanceStatus.ACTIVE,
            Instance.live_mandelboxes < Instance.mandelbox_capacity,
        )
        .order_by(Instance.live_mandelboxes.desc(), Instance.instance_name)
    ).all()
    for name in candidates:
        taken = session.execute(
            update(Instance)
            .where(
                Instance.instance_name == name,
                Instance.status == InstanceStatus.ACTIVE,
                Instance.live_mandelboxes < Instance.mandelbox_capacity,
            )
            .values(live_mandelboxes=Instance.live_mandelboxes + 1, empty_since=None)
            .returning(Instance.instance_name, Instance.ip, Instance.region)
            .execution_options(synchronize_session=False)
        ).first()
        if taken is None:
            continue
        session.execute(
            insert(Mandelbox).values(
                mandelbox_id=params["mandelbox_id"],
                instance_name=name,
                user_id=params["user_id"],
                session_id=params["session_id"],
                status=MandelboxStatus.ALLOCATED,
                created_at=params["now"],
                status_changed_at=params["now"],
            )
        )
        record_event(
            session,
            kind=EventKind.MANDELBOX_ASSIGNED,
            actor=params["actor"],
            instance_name=name,
            mandelbox_id=params["mandelbox_id"],
            detail={"region": taken.region, "client_commit_hash": params["commit"]},
        )
        return (taken.instance_name, taken.ip, taken.region)
    return None


def _other_versions_have_room(session: Session, regions: Sequence[str], commit: str, newest: dict[str, str]) -> bool:
    wanted = {newest.get(region, commit) for region in regions}
    return (
        session.execute(
            select(Instance.instance_name)
            .where(
                Instance.region.in_(list(regions)),
                Instance.status == InstanceStatus.ACTIVE,
                Instance.live_mandelboxes < Instance.mandelbox_capacity,
                Instance.client_commit_hash.not_in(list(wanted)),
            )
            .limit(1)
        ).first()
        is not None
    )


def _record_refusal(
    session: Session, *, user_id: str, regions: Sequence[str], commit: str, error: FractalError
) -> None:
    record_event(
        session,
        kind=EventKind.ASSIGNMENT_REFUSED,
        actor=f"user:{user_id}",
        detail={"code": str(error.code), "regions": list(regions)[:20], "client_commit_hash": commit},
    )
    session.commit()


def get_mandelbox_for_user(session: Session, *, user_id: str, mandelbox_id: uuid.UUID) -> MandelboxView:
    """The owner's view of one mandelbox; another user's id is indistinguishable from an unknown one.

    Raises:
        NotFoundError.
    """
    view = get_mandelbox_view(session, mandelbox_id=mandelbox_id)
    if view is None or view.user_id != user_id:
        raise NotFoundError("No such mandelbox.")
    return view


def get_mandelbox_view(session: Session, *, mandelbox_id: uuid.UUID) -> MandelboxView | None:
    row = session.execute(_view_query().where(Mandelbox.mandelbox_id == mandelbox_id)).first()
    return _to_view(row) if row is not None else None


def list_mandelbox_views(
    session: Session,
    *,
    user_id: str | None = None,
    status: MandelboxStatus | None = None,
    instance_name: str | None = None,
    limit: int = 500,
) -> list[MandelboxView]:
    """Newest first, filtered (admin view)."""
    query = _view_query()
    if user_id is not None:
        query = query.where(Mandelbox.user_id == user_id)
    if status is not None:
        query = query.where(Mandelbox.status == status)
    if instance_name is not None:
        query = query.where(Mandelbox.instance_name == instance_name)
    rows = session.execute(query.order_by(Mandelbox.created_at.desc()).limit(limit)).all()
    return [_to_view(row) for row in rows]


def delete_mandelbox_for_user(session: Session, *, user_id: str, mandelbox_id: uuid.UUID) -> MandelboxView:
    """A user ends their mandelbox: a live one becomes DYING and its host is told on its next heartbeat.

    Deleting one that already ended (or is already DYING) changes nothing.

    Raises:
        NotFoundError.
    """
    mandelbox = session.execute(
        select(Mandelbox).where(Mandelbox.mandelbox_id == mandelbox_id).with_for_update()
    ).scalar_one_or_none()
    if mandelbox is None or mandelbox.user_id != user_id:
        session.rollback()
        raise NotFoundError("No such mandelbox.")
    if mandelbox.status not in (MandelboxStatus.EXITED, MandelboxStatus.DYING):
        previous = mandelbox.status
        mandelbox.status = MandelboxStatus.DYING
        mandelbox.status_changed_at = utcnow()
        # Remembered now so the host's later EXITED report is attributed to the user.
        mandelbox.end_reason = EndReason.USER_DELETED
        record_event(
            session,
            kind=EventKind.MANDELBOX_DELETED,
            actor=f"user:{user_id}",
            instance_name=mandelbox.instance_name,
            mandelbox_id=mandelbox_id,
            detail={"from": str(previous)},
        )
    session.commit()
    view = get_mandelbox_view(session, mandelbox_id=mandelbox_id)
    assert view is not None
    return view


def _view_query() -> Select[*tuple[Any, ...]]:
    return select(
        Mandelbox.mandelbox_id,
        Mandelbox.instance_name,
        Instance.region,
        Instance.ip,
        Mandelbox.user_id,
        Mandelbox.session_id,
        Mandelbox.status,
        Mandelbox.created_at,
        Mandelbox.ended_at,
        Mandelbox.end_reason,
    ).join(Instance, Instance.instance_name == Mandelbox.instance_name)


def _to_view(row: Row[tuple[object, ...]]) -> MandelboxView:
    return MandelboxView(*row)  # type: ignore[arg-type,call-arg]


__all__ = [
    "AssignResult",
    "Assignment",
    "IdempotencyRequest",
    "MandelboxView",
    "assign_mandelbox",
    "delete_mandelbox_for_user",
    "get_mandelbox_for_user",
    "get_mandelbox_view",
    "list_mandelbox_views",
    "request_fingerprint",
]
