"""Periodic repairs of the fleet: silent hosts become LOST, unclaimed or unconfirmed mandelboxes end.

Each sweep is set-based (a fixed number of statements whatever the number of rows), only flushes, and records one
event per change through the movers. The scaler pass calls them inside its own transaction; ``run_sweeps`` runs
them alone and commits. Both follow the fleet's lock order (instances, then mandelboxes) and skip rows another
transaction holds: those are judged again on the next pass. "Silent for too long" and "unclaimed for too long"
are measured on the database's clock, so a scaler on a machine whose clock is off decides the same.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.orm import Session

from fractal.clock import database_now, format_timestamp
from fractal.config import Settings
from fractal.database import DriverStatement, one_of, try_advisory_xact_lock
from fractal.events import EventKind
from fractal.fleet.instances import move_instances
from fractal.fleet.mandelboxes import move_mandelboxes
from fractal.models import (
    TRANSIENT_MANDELBOXES,
    EndReason,
    Heartbeat,
    Instance,
    InstanceStatus,
    Mandelbox,
    MandelboxStatus,
)

__all__ = ["SWEEP_ACTOR", "SweepResult", "mark_silent_hosts_lost", "release_unclaimed_mandelboxes", "run_sweeps"]

SWEEP_ACTOR = "system:sweeps"
SWEEP_LOCK = "fractal:sweeps"
WATCHED_STATUSES = (InstanceStatus.ACTIVE, InstanceStatus.DRAINING)


@dataclass(frozen=True)
class SweepResult:
    """What one run of the sweeps changed (``skipped`` when another replica was sweeping)."""

    lost_instances: list[str] = field(default_factory=list)
    released_mandelboxes: list[uuid.UUID] = field(default_factory=list)
    skipped: bool = False


_instances = Instance.__table__
_heartbeats = Heartbeat.__table__
_mandelboxes = Mandelbox.__table__


def _last_seen() -> Any:
    """When the host was last heard from: its newest heartbeat, else when it entered its current status.

    Needs ``heartbeats`` outer-joined to ``instances`` (one hash join over the fleet, not a lookup per host).
    """
    return func.coalesce(_heartbeats.c.last_heartbeat_at, _instances.c.status_changed_at)


# The sweeps' reads, built once over the tables' columns (every scaler pass runs them; building them cost more than
# running them). Binds ``cutoff``.
# Lock the silent rows in name order and skip rows an assign is holding right now: that host is judged again next
# pass. Locking re-checks the status on the newest version. Instances first: the fleet's lock order.
_SILENT_HOSTS = DriverStatement(
    select(_instances.c.instance_name, _instances.c.status, _last_seen().label("last_seen"))
    .select_from(_instances)
    .outerjoin(_heartbeats, _heartbeats.c.instance_name == _instances.c.instance_name)
    .where(
        one_of(_instances.c.status, WATCHED_STATUSES),
        _last_seen() < bindparam("cutoff", type_=_instances.c.status_changed_at.type),
    )
    .order_by(_instances.c.instance_name)
    .with_for_update(key_share=True, skip_locked=True, of=_instances)
)
# Whether any mandelbox is stuck (ALLOCATED or DYING since before ``cutoff``): most passes have none, and one read
# says so instead of two empty moves. It states the transient index's own condition (TRANSIENT_MANDELBOXES), so
# both backends seek the few waiting boxes by age instead of walking every live one.
_ANY_STUCK = DriverStatement(
    select(_mandelboxes.c.mandelbox_id)
    .where(
        text(TRANSIENT_MANDELBOXES),
        _mandelboxes.c.status_changed_at < bindparam("cutoff", type_=_mandelboxes.c.status_changed_at.type),
    )
    .limit(1)
)


def mark_silent_hosts_lost(session: Session, *, host_timeout_s: float, now: datetime | None = None) -> list[str]:
    """ACTIVE/DRAINING hosts silent for ``host_timeout_s`` become LOST; their live mandelboxes end (HOST_LOST).

    Flushes only; the caller commits. ``now`` defaults to the database's clock. Returns the names marked LOST.
    """
    now = now or database_now(session)
    cutoff = now - timedelta(seconds=host_timeout_s)
    silent = _SILENT_HOSTS.execute(session, {"cutoff": cutoff}).all()
    if not silent:
        return []
    names = [row.instance_name for row in silent]
    last_seen_at = {
        row.instance_name: {
            "from": str(row.status),
            "last_seen_at": format_timestamp(row.last_seen) if row.last_seen is not None else None,
        }
        for row in silent
    }
    moved = move_instances(
        session,
        where=Instance.instance_name.in_(names),
        to=InstanceStatus.LOST,
        actor=SWEEP_ACTOR,
        reason="silent",
        from_statuses=WATCHED_STATUSES,
        detail={"host_timeout_s": host_timeout_s},
        row_detail=last_seen_at,
        now=now,
    )
    # The rows are LOST and locked by us: no assignment can add a mandelbox after this point.
    move_mandelboxes(
        session,
        where=Mandelbox.instance_name.in_(names),
        to=MandelboxStatus.EXITED,
        reason=EndReason.HOST_LOST,
        actor=SWEEP_ACTOR,
        event_kind=EventKind.MANDELBOX_RELEASED,
        now=now,
    )
    session.flush()
    return sorted(m.instance_name for m in moved)


def release_unclaimed_mandelboxes(
    session: Session, *, connect_timeout_s: float, now: datetime | None = None
) -> list[uuid.UUID]:
    """End mandelboxes stuck for ``connect_timeout_s`` and give their slots back. Flushes; the caller commits.

    ALLOCATED ones the host never claimed end with CLAIM_TIMEOUT. DYING ones the host never confirmed (for
    example a user deleted a box its host never saw) end too, keeping the user's USER_DELETED reason
    (HOST_EXITED when the host itself had moved it to DYING). ``now`` defaults to the database's clock.
    Returns the ids that ended.
    """
    now = now or database_now(session)
    cutoff = now - timedelta(seconds=connect_timeout_s)
    if _ANY_STUCK.execute(session, {"cutoff": cutoff}).first() is None:
        return []
    stuck = Mandelbox.status_changed_at < cutoff  # (move_mandelboxes adds the statuses and "not EXITED")
    unclaimed = move_mandelboxes(
        session,
        where=stuck,
        from_statuses=[MandelboxStatus.ALLOCATED],
        to=MandelboxStatus.EXITED,
        reason=EndReason.CLAIM_TIMEOUT,
        actor=SWEEP_ACTOR,
        event_kind=EventKind.MANDELBOX_RELEASED,
        skip_locked=True,
        now=now,
    )
    unconfirmed = move_mandelboxes(
        session,
        where=stuck,
        from_statuses=[MandelboxStatus.DYING],
        to=MandelboxStatus.EXITED,
        reason=EndReason.HOST_EXITED,
        actor=SWEEP_ACTOR,
        event_kind=EventKind.MANDELBOX_RELEASED,
        detail={"timeout": "DYING_TIMEOUT"},
        skip_locked=True,
        now=now,
    )
    return [m.mandelbox_id for m in unclaimed + unconfirmed]


def run_sweeps(session: Session, *, settings: Settings, now: datetime | None = None) -> SweepResult:
    """Run every sweep once under an advisory lock (a concurrent run skips) and commit."""
    if not try_advisory_xact_lock(session, SWEEP_LOCK):
        session.rollback()
        return SweepResult(skipped=True)
    now = now or database_now(session)
    lost = mark_silent_hosts_lost(session, now=now, host_timeout_s=settings.host_timeout_s)
    released = release_unclaimed_mandelboxes(session, now=now, connect_timeout_s=settings.connect_timeout_s)
    session.commit()
    return SweepResult(lost_instances=lost, released_mandelboxes=released)
