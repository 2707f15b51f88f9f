"""Mandelbox assignment: the one place capacity is handed to users.

Correctness rests on Postgres, not on the application: the chosen instance row is locked while its live
count is raised, a CHECK constraint makes ``live_mandelboxes > mandelbox_capacity`` impossible, and a
per-user advisory lock serialises one user's concurrent assigns so the per-user limit holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, Select, insert, select, text, update
from sqlalchemy.orm import Session

from fractal.database import advisory_xact_lock, is_postgres
from fractal.errors import (
    CommitHashMismatchError,
    FractalError,
    NoInstanceAvailableError,
    NotFoundError,
    RegionNotEnabledError,
    UserAlreadyActiveError,
)
from fractal.events import EventKind, record_event
from fractal.images import enabled_regions, newest_active_commits
from fractal.lifecycle import live_count_for_user, utcnow
from fractal.models import EndReason, Instance, InstanceStatus, Mandelbox, MandelboxStatus

LOCAL_DEV_COMMIT_HASH = "local_dev"
NO_CAPACITY_RETRY_AFTER_S = 10

# Postgres fast path (one round trip): pick the fullest ACTIVE instance with room, lock it, take a slot and create the
# mandelbox in one statement. FOR NO KEY UPDATE (not FOR UPDATE) so that heartbeat rows referencing the
# instance by foreign key (they take KEY SHARE) never block or get skipped by assignment. SKIP LOCKED
# lets concurrent assigns spread over candidates instead of queueing on the fullest one; the room check
# in WHERE is re-evaluated on the locked, newest row version, so a slot can never be taken twice.
_ASSIGN_SQL = """
WITH candidate AS (
    SELECT instance_name FROM instances
    WHERE region = :region AND client_commit_hash = :commit AND status = 'ACTIVE'
      AND live_mandelboxes < mandelbox_capacity
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
)
SELECT taken.instance_name, taken.ip, taken.region FROM taken
"""
_ASSIGN_SKIP_LOCKED = text(_ASSIGN_SQL)


@dataclass(frozen=True)
class Assignment:
    mandelbox_id: uuid.UUID
    instance_name: str
    ip: str | None
    region: str
    status: MandelboxStatus


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
) -> Assignment:
    """Give ``user_id`` a mandelbox on the fullest suitable instance of the first region with room.

    Args:
        regions: requested regions, nearest first; unknown or disabled ones are skipped.
        client_commit_hash: the client's version; only instances running exactly it qualify
            (``local_dev`` means each region's newest active image when ``allow_local_dev``).
        on_no_capacity: called with (regions, commit) when nothing had room, e.g. to wake the scaler.

    Returns:
        The new ALLOCATED mandelbox and where to connect.

    Raises:
        UserAlreadyActiveError, RegionNotEnabledError, CommitHashMismatchError, NoInstanceAvailableError.
    """
    try:
        assignment = _assign_in_transaction(
            session,
            user_id=user_id,
            regions=regions,
            client_commit_hash=client_commit_hash,
            session_id=session_id,
            max_per_user=max_per_user,
            allow_local_dev=allow_local_dev,
        )
    except FractalError as refusal:
        session.rollback()
        _record_refusal(session, user_id=user_id, regions=regions, commit=client_commit_hash, error=refusal)
        if isinstance(refusal, NoInstanceAvailableError) and on_no_capacity is not None:
            on_no_capacity(regions, client_commit_hash)
        raise
    session.commit()
    return assignment


def _assign_in_transaction(
    session: Session,
    *,
    user_id: str,
    regions: Sequence[str],
    client_commit_hash: str,
    session_id: str | None,
    max_per_user: int,
    allow_local_dev: bool,
) -> Assignment:
    enabled = set(enabled_regions(session))
    candidates = list(dict.fromkeys(region for region in regions if region in enabled))
    if not candidates:
        raise RegionNotEnabledError(details={"regions": list(regions)})

    # Serialise this user's assigns so that counting live mandelboxes and adding one is atomic.
    advisory_xact_lock(session, f"fractal:user:{user_id}")
    if live_count_for_user(session, user_id) >= max_per_user:
        raise UserAlreadyActiveError(details={"max_mandelboxes_per_user": max_per_user})

    newest = newest_active_commits(session) if allow_local_dev and client_commit_hash == LOCAL_DEV_COMMIT_HASH else {}
    mandelbox_id = uuid.uuid4()
    for region in candidates:
        commit = newest.get(region, client_commit_hash)
        row = _take_slot(
            session,
            region=region,
            commit=commit,
            mandelbox_id=mandelbox_id,
            user_id=user_id,
            session_id=session_id,
        )
        if row is not None:
            record_event(
                session,
                kind=EventKind.MANDELBOX_ASSIGNED,
                actor=f"user:{user_id}",
                instance_name=row.instance_name,
                mandelbox_id=mandelbox_id,
                detail={"region": row.region, "client_commit_hash": commit},
            )
            return Assignment(
                mandelbox_id=mandelbox_id,
                instance_name=row.instance_name,
                ip=row.ip,
                region=row.region,
                status=MandelboxStatus.ALLOCATED,
            )

    if _other_versions_have_room(session, candidates, client_commit_hash, newest):
        raise CommitHashMismatchError(details={"client_commit_hash": client_commit_hash})
    raise NoInstanceAvailableError(retry_after_s=NO_CAPACITY_RETRY_AFTER_S)


def _take_slot(
    session: Session,
    *,
    region: str,
    commit: str,
    mandelbox_id: uuid.UUID,
    user_id: str,
    session_id: str | None,
) -> Row[str, str | None, str] | None:
    """Lock an instance with room in ``region`` running ``commit``, take one slot, insert the mandelbox."""
    now = utcnow()
    if is_postgres(session):
        row = session.execute(
            _ASSIGN_SKIP_LOCKED,
            {
                "region": region,
                "commit": commit,
                "mandelbox_id": mandelbox_id,
                "user_id": user_id,
                "session_id": session_id,
                "now": now,
            },
        ).first()
        if row is not None:
            return row
    # Slow path, and the only path on SQLite: every candidate may be locked by concurrent assigns whose
    # commits can still leave room, so wait for them one row at a time. A guarded UPDATE waits for the
    # row lock and re-checks status and room on the newest version; holding at most one instance lock at a
    # time means two assigns can never deadlock (a multi-row blocking FOR UPDATE could).
    candidates = session.scalars(
        select(Instance.instance_name)
        .where(
            Instance.region == region,
            Instance.client_commit_hash == commit,
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
        if taken is not None:
            session.execute(
                insert(Mandelbox).values(
                    mandelbox_id=mandelbox_id,
                    instance_name=name,
                    user_id=user_id,
                    session_id=session_id,
                    status=MandelboxStatus.ALLOCATED,
                    created_at=now,
                    status_changed_at=now,
                )
            )
            return taken
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
    "Assignment",
    "MandelboxView",
    "assign_mandelbox",
    "delete_mandelbox_for_user",
    "get_mandelbox_for_user",
    "get_mandelbox_view",
    "list_mandelbox_views",
]
