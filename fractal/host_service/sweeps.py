"""Periodic repairs of the host protocol: silent hosts become LOST, unclaimed or unconfirmed mandelboxes end.

Each sweep is set-based (a fixed number of statements whatever the number of rows), only flushes, and
records one event per change. The scaler pass calls them inside its own transaction; ``run_sweeps`` runs them
alone and commits.

Lock order: a transaction that touches both a mandelbox row and its instance row takes the mandelbox first
(as ``exit_mandelboxes`` and the host's EXITED report do). The lost-host sweep is the one exception: it must
lock the instance first so no assignment can land between "mark LOST" and "end its mandelboxes"; it skips
instances that are locked right now instead of waiting, and the only writer that could hold one of their
mandelboxes while waiting for the instance is the silent host itself.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from fractal.clock import format_timestamp, utcnow
from fractal.config import Settings
from fractal.database import try_advisory_xact_lock
from fractal.events import EventKind, record_events
from fractal.lifecycle import exit_mandelboxes
from fractal.models import EndReason, Heartbeat, Instance, InstanceStatus, Mandelbox, MandelboxStatus

SWEEP_ACTOR = "system:sweeps"
SWEEP_LOCK = "fractal:sweeps"
WATCHED_STATUSES = (InstanceStatus.ACTIVE, InstanceStatus.DRAINING)


@dataclass(frozen=True)
class SweepResult:
    """What one run of the sweeps changed (``skipped`` when another replica was sweeping)."""

    lost_instances: list[str] = field(default_factory=list)
    released_mandelboxes: list[uuid.UUID] = field(default_factory=list)
    skipped: bool = False


def _last_seen() -> Any:
    """When the host was last heard from: its newest heartbeat, else when it entered its current status.

    Needs ``heartbeats`` outer-joined to ``instances`` (one hash join over the fleet, not a lookup per host).
    """
    return func.coalesce(Heartbeat.last_heartbeat_at, Instance.status_changed_at)


def mark_silent_hosts_lost(session: Session, *, now: datetime, host_timeout_s: float) -> list[str]:
    """ACTIVE/DRAINING hosts silent for ``host_timeout_s`` become LOST; their live mandelboxes end (HOST_LOST).

    Flushes only; the caller commits. Returns the names of the hosts marked LOST, sorted.
    """
    cutoff = now - timedelta(seconds=host_timeout_s)
    last_seen = _last_seen()
    # Lock the silent rows in name order (no deadlock with other multi-row lockers) and skip rows an assign is
    # holding right now: that host is judged again next pass. Locking re-checks status on the newest version.
    silent = session.execute(
        select(Instance.instance_name, Instance.status, last_seen.label("last_seen"))
        .outerjoin(Heartbeat, Heartbeat.instance_name == Instance.instance_name)
        .where(Instance.status.in_(WATCHED_STATUSES), last_seen < cutoff)
        .order_by(Instance.instance_name)
        .with_for_update(key_share=True, skip_locked=True, of=Instance)
    ).all()
    if not silent:
        return []
    names = [row.instance_name for row in silent]
    session.execute(
        update(Instance)
        .where(Instance.instance_name.in_(names), Instance.status.in_(WATCHED_STATUSES))
        .values(status=InstanceStatus.LOST, status_changed_at=now)
        .execution_options(synchronize_session=False)
    )
    # The rows are LOST and locked by us: no assignment can add a mandelbox after this point.
    ended = exit_mandelboxes(session, instance_names=names, reason=EndReason.HOST_LOST, now=now)
    events: list[dict[str, Any]] = [
        {
            "kind": EventKind.INSTANCE_LOST,
            "actor": SWEEP_ACTOR,
            "instance_name": row.instance_name,
            "detail": {
                "from": str(row.status),
                "last_seen_at": format_timestamp(row.last_seen) if row.last_seen is not None else None,
                "host_timeout_s": host_timeout_s,
            },
        }
        for row in silent
    ]
    events += [
        {
            "kind": EventKind.MANDELBOX_RELEASED,
            "actor": SWEEP_ACTOR,
            "instance_name": instance_name,
            "mandelbox_id": mandelbox_id,
            "detail": {"reason": str(EndReason.HOST_LOST)},
        }
        for mandelbox_id, instance_name in ended
    ]
    record_events(session, events)
    session.flush()
    return names


def release_unclaimed_mandelboxes(session: Session, *, now: datetime, connect_timeout_s: float) -> list[uuid.UUID]:
    """End mandelboxes stuck for ``connect_timeout_s`` and give their slots back. Flushes; the caller commits.

    ALLOCATED ones the host never claimed end with CLAIM_TIMEOUT. DYING ones the host never confirmed (for
    example a user deleted a box its host never saw) end too, keeping the user's USER_DELETED reason
    (HOST_EXITED when the host itself had moved it to DYING). Returns the ids that ended.
    """
    cutoff = now - timedelta(seconds=connect_timeout_s)
    # Lock the stuck rows, skipping any a host or user is changing right now; locking re-checks the status, so a
    # box claimed a moment ago no longer matches and is left alone.
    stuck = session.execute(
        select(Mandelbox.mandelbox_id, Mandelbox.instance_name, Mandelbox.status)
        .where(
            Mandelbox.status.in_((MandelboxStatus.ALLOCATED, MandelboxStatus.DYING)),
            Mandelbox.status_changed_at < cutoff,
        )
        .order_by(Mandelbox.mandelbox_id)
        .with_for_update(skip_locked=True)
    ).all()
    if not stuck:
        return []
    unclaimed = [row.mandelbox_id for row in stuck if row.status is MandelboxStatus.ALLOCATED]
    dying = [row.mandelbox_id for row in stuck if row.status is MandelboxStatus.DYING]
    ended_unclaimed = exit_mandelboxes(session, mandelbox_ids=unclaimed, reason=EndReason.CLAIM_TIMEOUT, now=now)
    ended_dying = exit_mandelboxes(session, mandelbox_ids=dying, reason=EndReason.HOST_EXITED, now=now)
    events: list[dict[str, Any]] = [
        {
            "kind": EventKind.MANDELBOX_RELEASED,
            "actor": SWEEP_ACTOR,
            "instance_name": instance_name,
            "mandelbox_id": mandelbox_id,
            "detail": {"reason": str(EndReason.CLAIM_TIMEOUT), "from": str(MandelboxStatus.ALLOCATED)},
        }
        for mandelbox_id, instance_name in ended_unclaimed
    ]
    events += [
        {
            "kind": EventKind.MANDELBOX_RELEASED,
            "actor": SWEEP_ACTOR,
            "instance_name": instance_name,
            "mandelbox_id": mandelbox_id,
            "detail": {"reason": "DYING_TIMEOUT", "from": str(MandelboxStatus.DYING)},
        }
        for mandelbox_id, instance_name in ended_dying
    ]
    record_events(session, events)
    session.flush()
    return [mandelbox_id for mandelbox_id, _ in ended_unclaimed + ended_dying]


def run_sweeps(session: Session, *, settings: Settings, now: datetime | None = None) -> SweepResult:
    """Run every sweep once under an advisory lock (a concurrent run skips) and commit."""
    now = now or utcnow()
    if not try_advisory_xact_lock(session, SWEEP_LOCK):
        session.rollback()
        return SweepResult(skipped=True)
    lost = mark_silent_hosts_lost(session, now=now, host_timeout_s=settings.host_timeout_s)
    released = release_unclaimed_mandelboxes(session, now=now, connect_timeout_s=settings.connect_timeout_s)
    session.commit()
    return SweepResult(lost_instances=lost, released_mandelboxes=released)


__all__ = [
    "SweepResult",
    "mark_silent_hosts_lost",
    "release_unclaimed_mandelboxes",
    "run_sweeps",
]
