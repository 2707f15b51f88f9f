"""One scaler pass: the steps of ``steps.py`` in order, under the leader lock, with a report. Idempotent,
leader-only, set-based.

Safety rules the pass keeps:
- It runs only while holding the scaler lease (``lease.py``: a row, compare-and-set, fencing token); a second
  replica skips (no double launch), and a replaced leader can neither act nor record.
- An instance row exists (PRE_CONNECTION, provider id ``pending:<name>``) and is committed *before* the cloud is
  asked to launch it, so a crash mid-launch leaves a row the next pass finds and cleans up.
- A row becomes TERMINATED only when the cloud's ``describe`` says the host is terminated or unknown; an AWS error
  leaves rows TERMINATING for the next pass. Nothing is deleted but history past its retention (the purge).
- Every statement is set-based: the number of statements per pass does not grow with the number of instances.
- When asked (``purge``, every ``FRACTAL_PURGE_INTERVAL_S`` by the loop), the pass ends by purging history past its
  retention (``fractal.retention``), in short batches, while its lease still holds, within a time bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from fractal.clock import database_now, format_timestamp
from fractal.cloud.base import CloudProvider
from fractal.config import Settings
from fractal.database import SessionFactory, session_scope
from fractal.retention import LogObjectStore, PurgeReport, RetentionPolicy, purge_history
from fractal.scaling import steps
from fractal.scaling.demand import ARRIVAL_WINDOW_MAX_S, LEAD_TIME_WINDOW_S, DemandCache
from fractal.scaling.lease import (
    SCALER_LEASE,
    LeaseToken,
    acquire_lease,
    holder_identity,
    lease_holds,
    release_lease,
)
from fractal.scaling.policy import LaunchPlan
from fractal.scaling.steps import LAUNCH_VISIBILITY_GRACE_S, PENDING_PREFIX, RegionError, ScalerAction

__all__ = [
    "LAUNCH_VISIBILITY_GRACE_S",
    "PENDING_PREFIX",
    "ReconcileReport",
    "RegionError",
    "ScalerAction",
    "reconcile_fleet",
]

log = structlog.get_logger(__name__)


@dataclass
class ReconcileReport:
    """What one pass did; ``ran`` is False when another replica held the scaler lock."""

    ran: bool
    started_at: datetime
    duration_s: float = 0.0
    skipped_reason: str | None = None
    actions: list[ScalerAction] = field(default_factory=list)
    region_errors: list[RegionError] = field(default_factory=list)
    # The history purge this pass ran (None: it was not due, or the lease was gone before it could start).
    purge: PurgeReport | None = None

    @property
    def errors(self) -> list[str]:
        """The failures' messages (the report's older, plain form of ``region_errors``)."""
        return [error.message for error in self.region_errors]

    def count(self, action: str) -> int:
        return sum(1 for a in self.actions if a.action == action)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ran": self.ran,
            "skipped_reason": self.skipped_reason,
            "started_at": format_timestamp(self.started_at),
            "duration_s": round(self.duration_s, 4),
            "actions": [asdict(a) for a in self.actions],
            "errors": self.errors,
            "region_errors": [asdict(e) for e in self.region_errors],
            "purge": None if self.purge is None else self.purge.as_dict(),
        }


def reconcile_fleet(
    source: SessionFactory | Session,
    *,
    settings: Settings,
    cloud: CloudProvider,
    now: datetime | None = None,
    purge: bool = False,
    log_objects: LogObjectStore | None = None,
    instance_namer: Callable[[LaunchPlan], str] | None = None,
    demand_cache: DemandCache | None = None,
) -> ReconcileReport:
    """Run one scaler pass unless another replica is running one.

    Args:
        source: a session factory (each pass opens one session) or a session to work in.
        cloud: where hosts are launched, terminated and described.
        now: the pass's clock (tests move it forward); defaults to the database's clock, read once per pass, so
            every replica judges stored times by the same clock whatever its own says.
        purge: end the pass with a history purge (``fractal.retention``), under the lease.
        log_objects: where the purge deletes log objects (None: rows only).
        instance_namer: names new instances (the simulator's, reproducible); random suffixes when None.
        demand_cache: what the demand reads kept from earlier passes (the scaler loop's and the simulator's, one per
            process and database; see ``DemandCache``); None: read anew.

    Returns:
        The actions taken, or ``ran=False`` with the reason when the lock was held elsewhere.
    """
    started = time.perf_counter()
    with _session(source) as session:
        now = now or database_now(session)
        report = ReconcileReport(ran=False, started_at=now)
        lease = acquire_lease(session, name=SCALER_LEASE, holder=holder_identity(), ttl_s=settings.scaler_lease_ttl_s)
        if lease is None:
            report.skipped_reason = "another scaler holds the lease"
            log.info("scaler.skipped", reason=report.skipped_reason)
            return report
        report.ran = True
        if demand_cache is not None and not _retention_keeps_demand_windows(settings):
            demand_cache = None  # a purge may delete events inside the windows: read them anew every pass
        try:
            _run_pass(
                session,
                settings=settings,
                cloud=cloud,
                now=now,
                report=report,
                lease=lease,
                instance_namer=instance_namer,
                demand_cache=demand_cache,
            )
            if purge:
                if demand_cache is not None:
                    demand_cache.clear()
                report.purge = _purge(session, settings=settings, lease=lease, log_objects=log_objects)
        finally:
            session.rollback()  # a failed pass leaves its transaction aborted; the release needs a fresh one
            release_lease(session, lease)
    report.duration_s = time.perf_counter() - started
    log.info(
        "scaler.pass",
        duration_s=round(report.duration_s, 4),
        actions=len(report.actions),
        errors=len(report.errors),
    )
    return report


@contextmanager
def _session(source: SessionFactory | Session) -> Iterator[Session]:
    if isinstance(source, Session):
        yield source
        return
    with session_scope(source) as session:
        yield session


def _run_pass(
    session: Session,
    *,
    settings: Settings,
    cloud: CloudProvider,
    now: datetime,
    report: ReconcileReport,
    lease: LeaseToken,
    instance_namer: Callable[[LaunchPlan], str] | None = None,
    demand_cache: DemandCache | None = None,
) -> None:
    """The pipeline (see ``steps``), committing after the sweeps, after the database-only moves, and in launch."""
    report.actions += steps.sweep(session, settings=settings, now=now)
    session.commit()
    report.actions += steps.retire_hosts(session, settings=settings, now=now)
    snapshot = steps.observe(
        session, now=now, waiting_window_s=settings.scaler_waiting_window_s, demand_cache=demand_cache
    )
    fleet_plan, decided = steps.plan(session, snapshot, settings=settings, now=now)
    report.actions += decided
    drained = steps.drain(session, fleet_plan, now=now)
    report.actions += drained
    report.actions += steps.terminate_drained(session, now=now, snapshot=snapshot, drained=drained)
    session.commit()
    for outcome in (
        steps.launch(
            session, cloud, fleet_plan.launches, settings=settings, now=now, lease=lease, instance_namer=instance_namer
        ),
        steps.terminate_in_cloud(session, cloud, now=now, lease=lease),
    ):
        report.actions += outcome.actions
        report.region_errors += outcome.region_errors
    session.commit()


def _retention_keeps_demand_windows(settings: Settings) -> bool:
    """Whether the purge keeps every event and instance of the demand reads' windows (the lead times' and the
    longest arrival window a policy may ask for: what ``DemandCache`` needs)."""
    retention = RetentionPolicy.from_settings(settings)
    return min(retention.events_s, retention.instances_s) > max(LEAD_TIME_WINDOW_S, ARRIVAL_WINDOW_MAX_S)


def _purge(
    session: Session, *, settings: Settings, lease: LeaseToken, log_objects: LogObjectStore | None
) -> PurgeReport | None:
    """The history purge at the end of a pass: the lease is renewed first (a long pass must not leave the purge a
    lease about to expire), checked before every batch, and the run is bounded well inside the lease period."""
    renewed = acquire_lease(session, name=lease.name, holder=lease.holder, ttl_s=settings.scaler_lease_ttl_s)
    if renewed is None or renewed.fencing_token != lease.fencing_token:
        return None

    def lease_still_holds() -> bool:
        holds = bool(session.execute(select(lease_holds(lease))).scalar())
        session.commit()
        return holds

    return purge_history(
        session,
        settings=settings,
        log_objects=log_objects,
        should_continue=lease_still_holds,
        max_s=min(settings.purge_max_s, settings.scaler_lease_ttl_s / 2),
    )
