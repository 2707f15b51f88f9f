"""One scaler pass: sweep, plan, launch, drain, terminate. Idempotent, leader-only, set-based.

Safety rules the pass keeps:
- It runs only while holding a session-level ``pg_try_advisory_lock``; a second replica skips (no double launch).
- An instance row exists (PRE_CONNECTION, provider id ``pending:<name>``) and is committed *before* the cloud is
  asked to launch it, so a crash mid-launch leaves a row the next pass finds and cleans up.
- A row becomes TERMINATED only when the cloud's ``describe`` says the host is terminated or unknown; an AWS error
  leaves rows TERMINATING for the next pass. Nothing is ever deleted.
- Every statement is set-based: the number of statements per pass does not grow with the number of instances.
"""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, and_, func, select, text, update
from sqlalchemy.orm import Session

from fractal.clock import database_now, format_timestamp
from fractal.cloud.base import CloudError, CloudHost, CloudProvider, HostRef, LaunchRequest
from fractal.config import Settings
from fractal.database import SessionFactory, advisory_key, session_scope
from fractal.events import EventKind, record_events
from fractal.fleet.instances import NewInstance, insert_instances, move_instances
from fractal.fleet.mandelboxes import move_mandelboxes
from fractal.fleet.sweeps import mark_silent_hosts_lost, release_unclaimed_mandelboxes
from fractal.models import EndReason, Image, Instance, InstanceStatus, Mandelbox, MandelboxStatus
from fractal.scaling.policy import DrainReason, FleetPlan, ImageTarget, InstanceSnapshot, LaunchPlan, plan_fleet

log = structlog.get_logger(__name__)

LOCK_NAME = "fractal:scaler"
ACTOR = "scaler"
# Provider id of a row whose launch has been requested but whose answer is not recorded yet.
PENDING_PREFIX = "pending:"
# A host whose launch outcome is unknown may be invisible to describe for a while (EC2 is eventually consistent):
# "not found" only proves it gone after this long.
LAUNCH_VISIBILITY_GRACE_S = 300.0


@dataclass(frozen=True)
class ScalerAction:
    """One decision of a pass (also written as an event)."""

    action: str
    instance_name: str | None = None
    region: str | None = None
    client_commit_hash: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RegionError:
    """A region whose cloud calls failed in a pass: it was skipped for that step; the other regions were not."""

    region: str
    operation: str  # "launch" or "terminate"
    code: str | None
    message: str


@dataclass
class ReconcileReport:
    """What one pass did; ``ran`` is False when another replica held the scaler lock."""

    ran: bool
    started_at: datetime
    duration_s: float = 0.0
    skipped_reason: str | None = None
    actions: list[ScalerAction] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    region_errors: list[RegionError] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(1 for a in self.actions if a.action == action)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ran": self.ran,
            "skipped_reason": self.skipped_reason,
            "started_at": format_timestamp(self.started_at),
            "duration_s": round(self.duration_s, 4),
            "actions": [asdict(a) for a in self.actions],
            "errors": list(self.errors),
            "region_errors": [asdict(e) for e in self.region_errors],
        }


def reconcile_fleet(
    source: SessionFactory | Session,
    *,
    settings: Settings,
    cloud: CloudProvider,
    now: datetime | None = None,
) -> ReconcileReport:
    """Run one scaler pass unless another replica is running one.

    Args:
        source: a session factory (each pass opens one session) or a session to work in.
        cloud: where hosts are launched, terminated and described.
        now: the pass's clock (tests move it forward); defaults to the database's clock, read once per pass, so
            every replica judges stored times by the same clock whatever its own says.

    Returns:
        The actions taken, or ``ran=False`` with the reason when the lock was held elsewhere.
    """
    started = time.perf_counter()
    with _session(source) as session, _leader_lock(session) as leader:
        now = now or database_now(session)
        report = ReconcileReport(ran=False, started_at=now)
        if not leader:
            report.skipped_reason = "another scaler holds the lock"
            log.info("scaler.skipped", reason=report.skipped_reason)
            return report
        report.ran = True
        _Pass(session, settings=settings, cloud=cloud, now=now, report=report).run()
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


@contextmanager
def _leader_lock(session: Session) -> Iterator[bool]:
    """Session-level advisory lock on a connection of its own: it survives the pass's commits and is released
    by Postgres if this process dies. On SQLite (a single development process) it always succeeds."""
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        yield True
        return
    key = advisory_key(LOCK_NAME)
    owned = isinstance(bind, Engine)
    connection: Connection = bind.connect() if isinstance(bind, Engine) else bind
    try:
        got = bool(connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        if owned:
            connection.commit()
        try:
            yield got
        finally:
            if got:
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                if owned:
                    connection.commit()
    finally:
        if owned:
            connection.close()


class _Pass:
    def __init__(
        self, session: Session, *, settings: Settings, cloud: CloudProvider, now: datetime, report: ReconcileReport
    ) -> None:
        self.session = session
        self.settings = settings
        self.cloud = cloud
        self.now = now
        self.report = report
        self.events: list[dict[str, Any]] = []

    # --- bookkeeping -----------------------------------------------------------------------------------
    def note(
        self,
        action: str,
        kind: EventKind,
        *,
        instance_name: str | None = None,
        region: str | None = None,
        client_commit_hash: str | None = None,
        **detail: Any,
    ) -> None:
        self.report.actions.append(ScalerAction(action, instance_name, region, client_commit_hash, detail))
        self.events.append(
            {
                "kind": kind,
                "actor": ACTOR,
                "instance_name": instance_name,
                "detail": {"action": action, "region": region, "client_commit_hash": client_commit_hash, **detail},
            }
        )

    def error(self, message: str, *, operation: str, region: str, code: str | None, **detail: Any) -> None:
        """A failed cloud call: reported per region (that region's step is skipped), an event, a warning."""
        self.report.errors.append(message)
        self.report.region_errors.append(RegionError(region=region, operation=operation, code=code, message=message))
        self.events.append(
            {
                "kind": EventKind.SCALER_ERROR,
                "actor": ACTOR,
                "detail": {"message": message, "operation": operation, "region": region, "code": code, **detail},
            }
        )
        log.warning("scaler.error", message=message, operation=operation, region=region, code=code, **detail)

    def commit(self) -> None:
        record_events(self.session, self.events)
        self.events = []
        self.session.commit()

    # --- the pass --------------------------------------------------------------------------------------
    def run(self) -> None:
        self.sweep()
        self.commit()
        self.retire_hosts()
        plan = self.plan()
        self.drain(plan)
        self.terminate_drained()
        self.commit()
        self.launch(plan.launches)
        self.terminate_in_cloud()
        self.commit()

    def sweep(self) -> None:
        """The host-protocol sweeps: silent hosts become LOST, unclaimed mandelboxes are released."""
        for name in mark_silent_hosts_lost(self.session, now=self.now, host_timeout_s=self.settings.host_timeout_s):
            self.report.actions.append(ScalerAction("lost", name))
        for mandelbox_id in release_unclaimed_mandelboxes(
            self.session, now=self.now, connect_timeout_s=self.settings.connect_timeout_s
        ):
            self.report.actions.append(ScalerAction("released", detail={"mandelbox_id": str(mandelbox_id)}))

    def _to_terminating(self, condition: Any, reason: str) -> None:
        self._move(condition, InstanceStatus.TERMINATING, "terminate", reason)

    def _move(
        self,
        condition: Any,
        status: InstanceStatus,
        action: str,
        reason: str,
        row_detail: dict[str, dict[str, Any]] | None = None,
        **values: Any,
    ) -> None:
        """One set-based status change through the fleet's mover (which records the events); each row that
        actually moved becomes an action of the report."""
        for moved in move_instances(
            self.session,
            where=condition,
            to=status,
            actor=ACTOR,
            reason=reason,
            values=values,
            detail={"action": action},
            row_detail=row_detail,
            now=self.now,
        ):
            self.report.actions.append(
                ScalerAction(action, moved.instance_name, moved.region, moved.client_commit_hash, {"reason": reason})
            )

    def retire_hosts(self) -> None:
        """LOST hosts, hosts that never shook hands, and launches a crashed pass left unconfirmed → TERMINATING."""
        self._to_terminating(Instance.status == InstanceStatus.LOST, "lost")
        boot_cutoff = self.now - timedelta(seconds=self.settings.boot_timeout_s)
        self._to_terminating(
            and_(Instance.status == InstanceStatus.PRE_CONNECTION, Instance.created_at < boot_cutoff), "boot_timeout"
        )
        # Every launch of a pass is recorded before its lock is released; a marker left now means a pass crashed
        # between asking the cloud and recording the answer. We cannot know what the cloud did, so clean it up.
        self._to_terminating(
            and_(
                Instance.status == InstanceStatus.PRE_CONNECTION,
                Instance.cloud_provider_id.startswith(PENDING_PREFIX, autoescape=True),
            ),
            "launch_unconfirmed",
        )

    def plan(self) -> FleetPlan:
        images = [
            ImageTarget(
                region=row.region,
                client_commit_hash=row.client_commit_hash,
                ami_id=row.ami_id,
                instance_type=row.instance_type,
                mandelbox_capacity=row.mandelbox_capacity,
                active=row.active,
                target_free=row.target_free,
            )
            for row in self.session.execute(
                select(
                    Image.region,
                    Image.client_commit_hash,
                    Image.ami_id,
                    Image.instance_type,
                    Image.mandelbox_capacity,
                    Image.active,
                    Image.target_free,
                ).order_by(Image.region, Image.created_at.desc(), Image.id.desc())
            )
        ]
        instances = [
            InstanceSnapshot(name, region, commit, InstanceStatus(status), capacity, live, idle_since)
            for name, region, commit, status, capacity, live, idle_since in self.session.execute(
                select(
                    Instance.instance_name,
                    Instance.region,
                    Instance.client_commit_hash,
                    Instance.status,
                    Instance.mandelbox_capacity,
                    Instance.live_mandelboxes,
                    func.coalesce(Instance.empty_since, Instance.status_changed_at),
                ).where(Instance.status != InstanceStatus.TERMINATED)
            )
        ]
        plan = plan_fleet(
            images,
            instances,
            now=self.now,
            default_target_free=self.settings.target_free_mandelboxes,
            max_instances_per_region=self.settings.max_instances_per_region,
            scale_down_delay_s=self.settings.scale_down_delay_s,
        )
        for launch in plan.launches:
            self.note(
                "plan_launch",
                EventKind.SCALER_DECISION,
                region=launch.region,
                client_commit_hash=launch.client_commit_hash,
                free=launch.free,
                target_free=launch.target_free,
                wanted=launch.wanted,
                count=launch.count,
                capped=launch.count < launch.wanted,
            )
        return plan

    def drain(self, plan: FleetPlan) -> None:
        """ACTIVE/PRE_CONNECTION → DRAINING, re-checking the plan's conditions in the UPDATE itself."""
        by_reason: dict[DrainReason, list[str]] = defaultdict(list)
        for drain in plan.drains:
            by_reason[drain.reason].append(drain.instance_name)
        for reason, names in sorted(by_reason.items()):
            condition = and_(
                Instance.instance_name.in_(names),
                Instance.status.in_([InstanceStatus.ACTIVE, InstanceStatus.PRE_CONNECTION]),
            )
            if reason is DrainReason.SPARE:
                # Races assignment: assign locks the row and raises live_mandelboxes; this UPDATE re-evaluates
                # live_mandelboxes = 0 on the newest row version, so a host that just got a user is never drained,
                # and once drained (status <> ACTIVE) assign's own WHERE skips it.
                condition = and_(condition, Instance.live_mandelboxes == 0)
            self._move(condition, InstanceStatus.DRAINING, "drain", str(reason))

    def terminate_drained(self) -> None:
        # No assignment ever targets a DRAINING host, so once empty it stays empty.
        self._to_terminating(
            and_(Instance.status == InstanceStatus.DRAINING, Instance.live_mandelboxes == 0), "drained_empty"
        )

    def launch(self, launches: Sequence[LaunchPlan]) -> None:
        """Create the rows (committed first), ask the cloud, record the provider ids."""
        new: list[NewInstance] = []
        for plan in launches:
            for _ in range(plan.count):
                name = f"{plan.region}-{plan.client_commit_hash[:8]}-{secrets.token_hex(4)}"
                new.append(
                    NewInstance(
                        instance_name=name,
                        region=plan.region,
                        client_commit_hash=plan.client_commit_hash,
                        ami_id=plan.ami_id,
                        instance_type=plan.instance_type,
                        mandelbox_capacity=plan.mandelbox_capacity,
                        cloud_provider_id=PENDING_PREFIX + name,
                    )
                )
        if not new:
            return
        host_secrets = insert_instances(self.session, new, now=self.now)
        self.commit()
        requests = [
            LaunchRequest(
                instance_name=n.instance_name,
                region=n.region,
                client_commit_hash=n.client_commit_hash,
                ami_id=n.ami_id,
                instance_type=n.instance_type,
                mandelbox_capacity=n.mandelbox_capacity,
                host_secret=host_secrets[n.instance_name],
                host_api_url=self.settings.host_api_url,
            )
            for n in new
        ]

        launched: list[dict[str, Any]] = []
        definitely_failed: list[str] = []
        unknown: list[str] = []
        # A region whose cloud refuses one launch (invalid region, throttling, an outage) gets no more requests
        # this pass; the other regions go on. Its remaining rows were never sent, so they are finished at once.
        failed_regions: set[str] = set()
        not_sent: list[str] = []
        for request in requests:
            if request.region in failed_regions:
                not_sent.append(request.instance_name)
                continue
            try:
                host = self.cloud.launch(request)
            except Exception as failure:  # any provider failure; unknown ones count as "may have started"
                maybe_done = failure.maybe_done if isinstance(failure, CloudError) else True
                (unknown if maybe_done else definitely_failed).append(request.instance_name)
                failed_regions.add(request.region)
                self.error(
                    f"launch failed: {failure}",
                    operation="launch",
                    region=request.region,
                    code=getattr(failure, "code", None) or type(failure).__name__,
                    instance_name=request.instance_name,
                )
                continue
            launched.append({"instance_name": request.instance_name, "cloud_provider_id": host.cloud_provider_id})
            self.note(
                "launch",
                EventKind.INSTANCE_LAUNCHED,
                instance_name=request.instance_name,
                region=request.region,
                client_commit_hash=request.client_commit_hash,
                cloud_provider_id=host.cloud_provider_id,
                cloud=self.cloud.name,
            )
        if launched:
            self.session.execute(update(Instance), launched)  # bulk UPDATE by primary key
        if definitely_failed:
            # The cloud refused the request: no host exists, so the row is finished at once (kept as history).
            self._move(
                Instance.instance_name.in_(definitely_failed),
                InstanceStatus.TERMINATED,
                "launch_failed",
                "launch_refused",
                cloud_provider_id=None,
            )
        if not_sent:
            self._move(
                Instance.instance_name.in_(not_sent),
                InstanceStatus.TERMINATED,
                "launch_skipped",
                "region_failed",
                cloud_provider_id=None,
            )
        if unknown:
            # The request may have reached the cloud: keep the marker and let termination find it by name.
            self._to_terminating(Instance.instance_name.in_(unknown), "launch_unconfirmed")
        self.commit()

    def terminate_in_cloud(self) -> None:
        """Terminate every TERMINATING host and mark TERMINATED those the cloud confirms gone."""
        rows = self.session.execute(
            select(Instance.instance_name, Instance.region, Instance.cloud_provider_id, Instance.status_changed_at)
            .where(Instance.status == InstanceStatus.TERMINATING)
            .order_by(Instance.region, Instance.instance_name)
        ).all()
        by_region: dict[str, list[Any]] = defaultdict(list)
        for row in rows:
            by_region[row.region].append(row)
        gone: dict[str, str | None] = {}
        for region, region_rows in sorted(by_region.items()):
            try:
                gone.update(self._terminate_region(region, region_rows))
            except Exception as failure:  # any provider failure stays in its region
                # Leave the rows TERMINATING: the next pass asks again. Never assume a host is gone.
                self.error(
                    f"terminate failed in {region}: {failure}",
                    operation="terminate",
                    region=region,
                    code=getattr(failure, "code", None) or type(failure).__name__,
                )
        if not gone:
            return
        names = sorted(gone)
        # The shared exit path: live mandelboxes end (an earlier reason, e.g. a user's delete, is kept) and their
        # slots are returned, so the counter is consistent before the row is finished.
        ended = move_mandelboxes(
            self.session,
            where=Mandelbox.instance_name.in_(names),
            to=MandelboxStatus.EXITED,
            reason=EndReason.INSTANCE_TERMINATED,
            actor=ACTOR,
            now=self.now,
        )
        self._move(
            Instance.instance_name.in_(names),
            InstanceStatus.TERMINATED,
            "terminated",
            "confirmed_gone",
            row_detail={name: {"cloud_provider_id": cloud_id} for name, cloud_id in gone.items()},
            live_mandelboxes=0,
            empty_since=func.coalesce(Instance.empty_since, self.now),
        )
        for box in ended:
            self.report.actions.append(
                ScalerAction("mandelbox_ended", box.instance_name, detail={"mandelbox_id": str(box.mandelbox_id)})
            )

    def _terminate_region(self, region: str, rows: Sequence[Any]) -> dict[str, str | None]:
        """Describe, terminate what still runs, describe again; returns name → provider id of confirmed-gone rows."""
        refs = [HostRef(row.instance_name, row.cloud_provider_id) for row in rows]
        hosts = _group(self.cloud.describe(region, refs), rows)
        running = sorted(h.cloud_provider_id for found in hosts.values() for h in found if not h.gone)
        if running:
            self.cloud.terminate(region, running)
            hosts = _group(self.cloud.describe(region, refs), rows)
        grace_cutoff = self.now - timedelta(seconds=LAUNCH_VISIBILITY_GRACE_S)
        confirmed: dict[str, str | None] = {}
        for row in rows:
            found = hosts.get(row.instance_name, [])
            if found:
                if all(h.gone for h in found):
                    confirmed[row.instance_name] = found[0].cloud_provider_id
                continue
            launch_unknown = (row.cloud_provider_id or "").startswith(PENDING_PREFIX)
            if launch_unknown and row.status_changed_at > grace_cutoff:
                continue  # it may exist but not be visible yet
            confirmed[row.instance_name] = row.cloud_provider_id if not launch_unknown else None
        return confirmed


def _group(hosts: Sequence[CloudHost], rows: Sequence[Any]) -> dict[str, list[CloudHost]]:
    """Cloud hosts per row: by provider id when the row has one, else by the instance-name tag."""
    name_by_id = {row.cloud_provider_id: row.instance_name for row in rows if row.cloud_provider_id}
    names = {row.instance_name for row in rows}
    grouped: dict[str, list[CloudHost]] = defaultdict(list)
    for host in hosts:
        name = name_by_id.get(host.cloud_provider_id)
        if name is None and host.instance_name in names:
            name = host.instance_name
        if name is not None:
            grouped[name].append(host)
    return grouped
