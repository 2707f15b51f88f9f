"""The steps of one scaler pass, each a function with explicit inputs and outputs.

    sweep → retire_hosts → observe → plan → drain → terminate_drained → launch → terminate_in_cloud

Every status change goes through the fleet's movers (which write the events); what a step returns is the list of
``ScalerAction`` it took (and, for the steps that call the cloud, the regions whose calls failed). The pass in
``reconcile.py`` chains them and decides where to commit.
"""

from __future__ import annotations

import functools
import json
import operator
import secrets
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from sqlalchemy import (
    ColumnElement,
    Integer,
    Table,
    Text,
    and_,
    bindparam,
    case,
    exists,
    func,
    not_,
    null,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy import cast as cast_
from sqlalchemy.orm import Session

from fractal.cloud.base import CloudError, CloudHost, CloudProvider, HostRef, LaunchRequest, send_deadline
from fractal.config import Settings
from fractal.database import DriverStatement, in_values
from fractal.events import EventKind, record_events
from fractal.fleet.instances import NewInstance, insert_instances, move_instances
from fractal.fleet.mandelboxes import move_mandelboxes
from fractal.fleet.sweeps import mark_silent_hosts_lost, release_unclaimed_mandelboxes
from fractal.models import EndReason, Image, Instance, InstanceStatus, Mandelbox, MandelboxStatus
from fractal.scaling.demand import (
    WAITING_WINDOW_S,
    DemandCache,
    launch_lead_times,
    recent_arrivals,
    waiting_users,
)
from fractal.scaling.lease import LeaseToken, check_lease, fence
from fractal.scaling.policy import (
    BufferKind,
    BufferPolicy,
    BusyHosts,
    DemandStats,
    DrainReason,
    FleetPlan,
    ImageTarget,
    InstanceSnapshot,
    LaunchPlan,
    plan_fleet,
)

log = structlog.get_logger(__name__)

ACTOR = "scaler"
# Provider id of a row whose launch has been requested but whose answer is not recorded yet.
PENDING_PREFIX = "pending:"
# A host whose launch outcome is unknown may be invisible to describe for a while (EC2 is eventually consistent):
# "not found" only proves it gone after this long.
LAUNCH_VISIBILITY_GRACE_S = 300.0


@dataclass(frozen=True)
class ScalerAction:
    """One decision of a pass."""

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
class CloudStepResult:
    """What a step that calls the cloud did, and where the cloud failed it."""

    actions: list[ScalerAction] = field(default_factory=list)
    region_errors: list[RegionError] = field(default_factory=list)


@dataclass(frozen=True)
class FleetSnapshot:
    """The images and the not-yet-terminated instances, as the policy sees them: ``instances`` one by one, except
    the busy ACTIVE hosts of active images, summed per (region, version) in ``busy`` (see ``BusyHosts``)."""

    images: list[ImageTarget]
    instances: list[InstanceSnapshot]
    busy: list[BusyHosts] = field(default_factory=list)


# --- shared pieces -------------------------------------------------------------------------------------------


def move(
    session: Session,
    *,
    where: ColumnElement[bool],
    to: InstanceStatus,
    action: str,
    reason: str,
    now: datetime,
    row_detail: dict[str, dict[str, Any]] | None = None,
    values: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
) -> list[ScalerAction]:
    """One set-based instance move through the fleet's mover (which records the events), as report actions.

    ``values``: other columns written; ``params``: the values of ``where``'s and ``values``' bind parameters, which
    makes them reusable (the pass's module-level conditions below: the UPDATE is built once, see ``move_instances``).
    """
    moved = move_instances(
        session,
        where=where,
        to=to,
        actor=ACTOR,
        reason=reason,
        values=values,
        detail={"action": action},
        row_detail=row_detail,
        now=now,
        params=params,
    )
    return [ScalerAction(action, m.instance_name, m.region, m.client_commit_hash, {"reason": reason}) for m in moved]


def record_decisions(session: Session, kind: EventKind, actions: Sequence[ScalerAction]) -> None:
    """Decisions that are not status moves (a planned launch, a launch's provider id) become events too."""
    record_events(
        session,
        [
            {
                "kind": kind,
                "actor": ACTOR,
                "instance_name": a.instance_name,
                "detail": {
                    "action": a.action,
                    "region": a.region,
                    "client_commit_hash": a.client_commit_hash,
                    **a.detail,
                },
            }
            for a in actions
        ],
    )


def region_failed(
    session: Session, lease: LeaseToken, *, operation: str, region: str, failure: Exception, **detail: Any
) -> RegionError:
    """A cloud call failed in ``region``: an event (recorded only while ``lease`` holds) and one warning; the caller
    skips that region's step."""
    fence(session, lease)
    code = getattr(failure, "code", None) or type(failure).__name__
    message = f"{operation} failed in {region}: {failure}"
    record_events(
        session,
        [
            {
                "kind": EventKind.SCALER_ERROR,
                "actor": ACTOR,
                "detail": {"message": message, "operation": operation, "region": region, "code": code, **detail},
            }
        ],
    )
    log.warning("scaler.error", message=message, operation=operation, region=region, code=code, **detail)
    # The next region's cloud calls may take long: they must not run inside an open transaction, which the server
    # would end after FRACTAL_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS.
    session.commit()
    return RegionError(region=region, operation=operation, code=code, message=message)


# --- the steps -----------------------------------------------------------------------------------------------


def sweep(session: Session, *, settings: Settings, now: datetime) -> list[ScalerAction]:
    """The fleet's sweeps: silent hosts become LOST, unclaimed mandelboxes are released."""
    lost = mark_silent_hosts_lost(session, now=now, host_timeout_s=settings.host_timeout_s)
    released = release_unclaimed_mandelboxes(session, now=now, connect_timeout_s=settings.connect_timeout_s)
    return [ScalerAction("lost", name) for name in lost] + [
        ScalerAction("released", detail={"mandelbox_id": str(mandelbox_id)}) for mandelbox_id in released
    ]


def retire_hosts(session: Session, *, settings: Settings, now: datetime) -> list[ScalerAction]:
    """LOST hosts, hosts that never shook hands, and launches a crashed pass left unconfirmed → TERMINATING."""
    bound = {"p_boot_cutoff": now - timedelta(seconds=settings.boot_timeout_s)}
    # Most passes have nothing to retire: one read (on the status index) says so, instead of three empty moves.
    if _ANY_TO_RETIRE.execute(session, bound).first() is None:
        return []
    actions: list[ScalerAction] = []
    for reason, where in _RETIRE.items():
        actions += move(
            session,
            where=where,
            to=InstanceStatus.TERMINATING,
            action="terminate",
            reason=reason,
            now=now,
            params=bound,
        )
    return actions


_instances = cast(Table, Instance.__table__)
_BOOTING = _instances.c.status == InstanceStatus.PRE_CONNECTION
# retire_hosts' moves, by reason, built once over the table's columns (``p_boot_cutoff`` bound per pass).
_RETIRE: dict[str, ColumnElement[bool]] = {
    "lost": _instances.c.status == InstanceStatus.LOST,
    "boot_timeout": and_(
        _BOOTING, _instances.c.created_at < bindparam("p_boot_cutoff", type_=_instances.c.created_at.type)
    ),
    # Every launch of a pass is recorded before its lock is released; a marker left now means a pass crashed
    # between asking the cloud and recording the answer. We cannot know what the cloud did, so clean it up.
    "launch_unconfirmed": and_(_BOOTING, _instances.c.cloud_provider_id.startswith(PENDING_PREFIX, autoescape=True)),
}
# Whether any row matches one of retire_hosts' moves (the same conditions, over the table's columns).
_ANY_TO_RETIRE = DriverStatement(
    select(_instances.c.instance_name)
    .where(
        or_(
            _instances.c.status == InstanceStatus.LOST,
            and_(
                _instances.c.status == InstanceStatus.PRE_CONNECTION,
                or_(
                    _instances.c.created_at < bindparam("p_boot_cutoff", type_=_instances.c.created_at.type),
                    _instances.c.cloud_provider_id.startswith(PENDING_PREFIX, autoescape=True),
                ),
            ),
        )
    )
    .limit(1)
)


# The statuses of the fleet the policy sees, named rather than "not TERMINATED": an IN list can use the status index,
# a "<>" reads every instance row ever made (the TERMINATED history grows all day).
NOT_TERMINATED = sorted(status for status in InstanceStatus if status is not InstanceStatus.TERMINATED)


def observe(
    session: Session,
    *,
    now: datetime | None = None,
    waiting_window_s: float = WAITING_WINDOW_S,
    demand_cache: DemandCache | None = None,
) -> FleetSnapshot:
    """Read what the policy needs: every image (newest first per region) and every instance not TERMINATED; as of
    ``now``, the users waiting after a 503 per image (refused in the last ``waiting_window_s``; 0: none counted),
    and for images with a demand-aware buffer policy the recent arrivals and launch lead times (``demand_cache``:
    what earlier passes read, see ``DemandCache``; None: read anew)."""
    rows = _IMAGES_READ.execute(session).all()
    waiting: dict[tuple[str, str], int] = {}
    if now is not None and waiting_window_s > 0:
        asks = demand_cache.asks if demand_cache is not None else None
        waiting = waiting_users(session, now=now, window_s=waiting_window_s, cache=asks)
    # Each image built once with its waiting users (a dataclass ``replace`` per image costs as much as building it).
    images = [
        ImageTarget(
            region=region,
            client_commit_hash=commit,
            ami_id=ami_id,
            instance_type=instance_type,
            mandelbox_capacity=capacity,
            active=active,
            target_free=target_free,
            buffer_policy=_policy_of(buffer_policy),
            waiting=waiting.get((region, commit), 0),
        )
        for region, commit, ami_id, instance_type, capacity, active, target_free, buffer_policy in rows
    ]
    if now is not None:
        images = _with_demand(session, images, now=now, demand_cache=demand_cache)
    # One statement (one snapshot of the fleet on Postgres too: a host that gets its first user between two reads
    # would be in neither), all rows at once; a row with a name is one host (its first columns are InstanceSnapshot's
    # fields in order, the status column's type already gives the InstanceStatus member), a row without one a
    # group of busy hosts.
    instances: list[InstanceSnapshot] = []
    busy: list[BusyHosts] = []
    for row in _FLEET_READ.execute(session).all():
        if row[0] is not None:
            instances.append(_SNAPSHOT_OF_ROW(row[:7]))
        else:
            busy.append(BusyHosts(row[1], row[2], row[7], row[8]))
    return FleetSnapshot(images=images, instances=instances, busy=busy)


# Every image, newest first per region (built once, like the fleet read below).
_IMAGES_READ = DriverStatement(
    select(
        Image.region,
        Image.client_commit_hash,
        Image.ami_id,
        Image.instance_type,
        Image.mandelbox_capacity,
        Image.active,
        Image.target_free,
        # As its text: the policy is parsed once per distinct text (``_policy_of``), not once per image every pass.
        cast_(Image.buffer_policy, Text),
    ).order_by(Image.region, Image.created_at.desc(), Image.id.desc())
)


@functools.lru_cache(maxsize=1024)
def _policy_of(stored: str | None) -> BufferPolicy | None:
    """An image's stored buffer policy (JSON text, or None) as the policy sees it; None: static."""
    value = json.loads(stored) if stored is not None else None
    return BufferPolicy.from_dict(value) if value else None


# One fleet row -> its snapshot (the row's values in InstanceSnapshot's field order; see _FLEET_READ).
_SNAPSHOT_OF_ROW: Callable[[Any], InstanceSnapshot] = InstanceSnapshot._make

_images = cast(Table, Image.__table__)


def _has_active_image(region: ColumnElement[str], client_commit_hash: ColumnElement[str]) -> ColumnElement[bool]:
    return exists().where(
        _images.c.region == region, _images.c.client_commit_hash == client_commit_hash, _images.c.active
    )


_BUSY = and_(_instances.c.status == InstanceStatus.ACTIVE, _instances.c.live_mandelboxes > 0)
# Busy ACTIVE hosts summed per (region, version), every version; the fleet read keeps the groups whose version has
# an active image (tested once per group, not per host).
_busy_groups = (
    select(
        _instances.c.region,
        _instances.c.client_commit_hash,
        _instances.c.status,
        func.count().label("hosts"),
        func.sum(
            case(
                (
                    _instances.c.mandelbox_capacity > _instances.c.live_mandelboxes,
                    _instances.c.mandelbox_capacity - _instances.c.live_mandelboxes,
                ),
                else_=0,
            )
        ).label("free"),
    )
    .where(_BUSY)
    .group_by(_instances.c.region, _instances.c.client_commit_hash, _instances.c.status)
    .subquery("busy")
)
# The fleet read, built once, over the table's columns (plain rows, no ORM loading): every host the policy may act on
# one by one (all but the busy ACTIVE hosts of active images: see BusyHosts), with an idle time only where the
# policy can use one (an empty ACTIVE host, a drain candidate: the other rows' timestamps are not fetched and
# parsed); then those busy hosts summed per (region, version), with no name. Both parts in one statement: one
# snapshot, so a host is in exactly one of them.
_FLEET_READ = DriverStatement(
    union_all(
        select(
            _instances.c.instance_name,
            _instances.c.region,
            _instances.c.client_commit_hash,
            _instances.c.status,
            _instances.c.mandelbox_capacity,
            _instances.c.live_mandelboxes,
            case(
                (
                    and_(_instances.c.status == InstanceStatus.ACTIVE, _instances.c.live_mandelboxes == 0),
                    func.coalesce(_instances.c.empty_since, _instances.c.status_changed_at),
                ),
                else_=None,
            ).label("idle_since"),
            cast_(null(), Integer).label("hosts"),
            cast_(null(), Integer).label("free"),
        ).where(
            _instances.c.status.in_(NOT_TERMINATED),
            not_(and_(_BUSY, _has_active_image(_instances.c.region, _instances.c.client_commit_hash))),
        ),
        select(
            null(),
            _busy_groups.c.region,
            _busy_groups.c.client_commit_hash,
            _busy_groups.c.status,
            null(),
            null(),
            null(),
            _busy_groups.c.hosts,
            _busy_groups.c.free,
        ).where(_has_active_image(_busy_groups.c.region, _busy_groups.c.client_commit_hash)),
    )
)


def _with_demand(
    session: Session, images: list[ImageTarget], *, now: datetime, demand_cache: DemandCache | None = None
) -> list[ImageTarget]:
    """The images, those with a demand policy carrying what was measured (one read per distinct window)."""
    demand_aware = [i for i in images if i.active and i.buffer_policy and i.buffer_policy.kind is BufferKind.DEMAND]
    if not demand_aware:
        return images
    lead = launch_lead_times(
        session,
        now=now,
        regions={i.region for i in demand_aware},
        cache=demand_cache.lead_times if demand_cache is not None else None,
    )
    by_window: dict[float, list[ImageTarget]] = defaultdict(list)
    for image in demand_aware:
        assert image.buffer_policy is not None
        by_window[image.buffer_policy.window_s].append(image)
    stats: dict[tuple[str, str], DemandStats] = {}
    for window_s, group in by_window.items():
        counts = recent_arrivals(
            session,
            now=now,
            window_s=window_s,
            keys=[(i.region, i.client_commit_hash) for i in group],
            cache=demand_cache.asks if demand_cache is not None else None,
        )
        for image in group:
            key = (image.region, image.client_commit_hash)
            stats[key] = DemandStats(arrivals=counts.get(key, 0), window_s=window_s, lead_time_s=lead.get(image.region))
    return [
        replace(image, demand=stats[(image.region, image.client_commit_hash)])
        if (image.region, image.client_commit_hash) in stats
        else image
        for image in images
    ]


def plan(
    session: Session, snapshot: FleetSnapshot, *, settings: Settings, now: datetime
) -> tuple[FleetPlan, list[ScalerAction]]:
    """The policy's plan for this snapshot, and its launch decisions as actions (recorded as events)."""
    fleet_plan = plan_fleet(
        snapshot.images,
        snapshot.instances,
        busy=snapshot.busy,
        now=now,
        default_target_free=settings.target_free_mandelboxes,
        max_instances_per_region=settings.max_instances_per_region,
        scale_down_delay_s=settings.scale_down_delay_s,
    )
    decided = [
        ScalerAction(
            "plan_launch",
            region=launch.region,
            client_commit_hash=launch.client_commit_hash,
            detail={
                "free": launch.free,
                "target_free": launch.target_free,
                "wanted": launch.wanted,
                "count": launch.count,
                "capped": launch.count < launch.wanted,
                "target_reason": launch.target_reason,
                "waiting": launch.waiting,
            },
        )
        for launch in fleet_plan.launches
    ]
    record_decisions(session, EventKind.SCALER_DECISION, decided)
    return fleet_plan, decided


def drain(session: Session, fleet_plan: FleetPlan, *, now: datetime) -> list[ScalerAction]:
    """The plan's drains: ACTIVE/PRE_CONNECTION → DRAINING, re-checking the plan's conditions in the UPDATE."""
    by_reason: dict[DrainReason, list[str]] = defaultdict(list)
    for drained in fleet_plan.drains:
        by_reason[drained.reason].append(drained.instance_name)
    actions: list[ScalerAction] = []
    for reason, names in sorted(by_reason.items()):
        # A spare host's drain races assignment: assign locks the row and raises live_mandelboxes; this UPDATE
        # re-evaluates live_mandelboxes = 0 on the newest row version, so a host that just got a user is never
        # drained, and once drained (status <> ACTIVE) assign's own WHERE skips it.
        where = _EMPTY_NAMED if reason is DrainReason.SPARE else _NAMED
        actions += move(
            session,
            where=where,
            to=InstanceStatus.DRAINING,
            action="drain",
            reason=str(reason),
            now=now,
            params={"p_names": names},
        )
    return actions


# The pass's moves by name, built once over the table's columns (the names one list parameter, ``p_names``, so that
# the movers run them as DriverStatements): building an UPDATE per move cost more than running it.
_NAMED = in_values(_instances.c.instance_name, "p_names")
_EMPTY_NAMED = and_(_NAMED, _instances.c.live_mandelboxes == 0)
_DRAINING_EMPTY = and_(_instances.c.status == InstanceStatus.DRAINING, _instances.c.live_mandelboxes == 0)
_mandelboxes = cast(Table, Mandelbox.__table__)
_BOXES_ON_NAMED = in_values(_mandelboxes.c.instance_name, "p_names")
# What a launch the cloud refused (or never got) writes besides TERMINATED, and what a confirmed-gone host does:
# its live count back to zero, empty since ``p_now`` unless it was empty already.
_NO_PROVIDER_ID: Mapping[str, Any] = {"cloud_provider_id": None}
_GONE_VALUES: Mapping[str, Any] = {
    "live_mandelboxes": 0,
    "empty_since": func.coalesce(_instances.c.empty_since, bindparam("p_now", type_=_instances.c.empty_since.type)),
}


def terminate_drained(
    session: Session, *, now: datetime, snapshot: FleetSnapshot | None = None, drained: Sequence[ScalerAction] = ()
) -> list[ScalerAction]:
    """DRAINING hosts with no live mandelbox → TERMINATING (no assignment targets a DRAINING host, so an empty
    one stays empty).

    Given the pass's ``snapshot`` and what its drain step ``drained``: nothing to do (no statement) when neither
    shows a DRAINING host. Only a drain makes one, and this pass's scaler is the only one; a host an operator
    drains meanwhile is terminated by the next pass, as if drained a moment later.
    """
    # ``in`` over the statuses compares in C (identity first), where a generator of ``is`` tests runs per host.
    draining = snapshot is None or InstanceStatus.DRAINING in map(_STATUS_OF, snapshot.instances)
    if not draining and not drained:
        return []
    return move(
        session,
        where=_DRAINING_EMPTY,
        to=InstanceStatus.TERMINATING,
        action="terminate",
        reason="drained_empty",
        now=now,
        params={},
    )


_STATUS_OF = operator.attrgetter("status")


def launch(
    session: Session,
    cloud: CloudProvider,
    launches: Sequence[LaunchPlan],
    *,
    settings: Settings,
    now: datetime,
    lease: LeaseToken,
    instance_namer: Callable[[LaunchPlan], str] | None = None,
) -> CloudStepResult:
    """Create the rows and commit them first (a crash mid-launch leaves rows the next pass cleans up), ask the
    cloud, record the provider ids. A region whose cloud refuses one launch gets no more requests this pass.

    Before each request the lease is checked (``check_lease``: renewed at least every half period, else LeaseLost
    ends the pass), and what the cloud answered is recorded in a transaction fenced by the lease: a former leader
    woken after its lease passed on launches and records nothing (the successor finds its ``pending:`` rows and
    cleans them up).
    """
    result = CloudStepResult()
    new = [_new_instance(p, instance_namer) for p in launches for _ in range(p.count)]
    if not new:
        return result
    host_secrets = insert_instances(session, new, now=now)
    session.commit()

    launched: list[ScalerAction] = []
    refused: list[str] = []  # the cloud said no: no host exists
    unknown: list[str] = []  # the request may have reached the cloud
    not_sent: list[str] = []  # their region had failed already
    failed_regions: set[str] = set()
    deadline: float | None = None
    for row in new:
        if row.region in failed_regions:
            not_sent.append(row.instance_name)
            continue
        request = LaunchRequest(
            instance_name=row.instance_name,
            region=row.region,
            client_commit_hash=row.client_commit_hash,
            ami_id=row.ami_id,
            instance_type=row.instance_type,
            mandelbox_capacity=row.mandelbox_capacity,
            host_secret=host_secrets[row.instance_name],
            host_api_url=settings.host_api_url,
        )
        deadline = check_lease(session, lease, held_until=deadline)
        try:
            with send_deadline(deadline):  # a request the pass was too stalled to send in time is not sent
                host = cloud.launch(request)
        except Exception as failure:  # any provider failure; unknown ones count as "may have started"
            maybe_done = failure.maybe_done if isinstance(failure, CloudError) else True
            (unknown if maybe_done else refused).append(row.instance_name)
            failed_regions.add(row.region)
            result.region_errors.append(
                region_failed(
                    session,
                    lease,
                    operation="launch",
                    region=row.region,
                    failure=failure,
                    instance_name=row.instance_name,
                )
            )
            continue
        launched.append(
            ScalerAction(
                "launch",
                row.instance_name,
                row.region,
                row.client_commit_hash,
                {"cloud_provider_id": host.cloud_provider_id, "cloud": cloud.name},
            )
        )
    if launched or refused or not_sent or unknown:
        fence(session, lease)  # from here to the commit below, no successor can take the lease
    if launched:
        session.execute(  # the provider ids replace the pending markers (by primary key)
            _RECORD_PROVIDER_ID,
            [{"p_name": a.instance_name, "p_cloud_provider_id": a.detail["cloud_provider_id"]} for a in launched],
        )
        record_decisions(session, EventKind.INSTANCE_LAUNCHED, launched)
    result.actions += launched
    for names, reason in ((refused, "launch_refused"), (not_sent, "region_failed")):
        if names:  # no host exists: the row is finished at once (kept as history)
            result.actions += move(
                session,
                where=_NAMED,
                to=InstanceStatus.TERMINATED,
                action="launch_failed" if reason == "launch_refused" else "launch_skipped",
                reason=reason,
                now=now,
                values=_NO_PROVIDER_ID,
                params={"p_names": names},
            )
    if unknown:  # keep the marker and let termination find the host by name
        result.actions += move(
            session,
            where=_NAMED,
            to=InstanceStatus.TERMINATING,
            action="terminate",
            reason="launch_unconfirmed",
            now=now,
            params={"p_names": unknown},
        )
    session.commit()
    return result


# launch's record of what the cloud answered, built once over the table (one executemany, by primary key).
_RECORD_PROVIDER_ID = (
    update(_instances)
    .where(_instances.c.instance_name == bindparam("p_name"))
    .values(cloud_provider_id=bindparam("p_cloud_provider_id"))
)


def _new_instance(plan: LaunchPlan, namer: Callable[[LaunchPlan], str] | None = None) -> NewInstance:
    """A row for one planned launch, marked pending until the cloud answers. ``namer`` (the simulator's, for
    reproducible runs) replaces the random suffix."""
    name = namer(plan) if namer is not None else f"{plan.region}-{plan.client_commit_hash[:8]}-{secrets.token_hex(4)}"
    return NewInstance(
        instance_name=name,
        region=plan.region,
        client_commit_hash=plan.client_commit_hash,
        ami_id=plan.ami_id,
        instance_type=plan.instance_type,
        mandelbox_capacity=plan.mandelbox_capacity,
        cloud_provider_id=PENDING_PREFIX + name,
    )


def terminate_in_cloud(session: Session, cloud: CloudProvider, *, now: datetime, lease: LeaseToken) -> CloudStepResult:
    """Terminate every TERMINATING host and mark TERMINATED those the cloud confirms gone, region by region."""
    result = CloudStepResult()
    rows = _TERMINATING_READ.execute(session).all()
    if not rows:  # most passes: no cloud call follows, so the pass's own commit ends the read
        return result
    # End the read before asking the cloud (describe/terminate may take many seconds with retries): an open
    # transaction idle that long is ended by the server (FRACTAL_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS). The leader
    # lock, not this transaction, keeps other passes away from these rows.
    session.commit()
    by_region: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_region[row.region].append(row)
    gone: dict[str, str | None] = {}
    deadline: float | None = None
    for region, region_rows in sorted(by_region.items()):
        deadline = check_lease(session, lease, held_until=deadline)
        try:
            with send_deadline(deadline):
                gone.update(_terminate_region(cloud, region, region_rows, now=now))
        except Exception as failure:  # any provider failure stays in its region
            # Leave the rows TERMINATING: the next pass asks again. Never assume a host is gone.
            result.region_errors.append(
                region_failed(session, lease, operation="terminate", region=region, failure=failure)
            )
    if not gone:
        return result
    names = sorted(gone)
    fence(session, lease)  # a stale leader ends nothing and finishes no row; the pass's final commit ends the fence
    # Live mandelboxes end (an earlier reason, e.g. a user's delete, is kept) and their slots are returned, so the
    # counter is consistent before the row is finished.
    ended = move_mandelboxes(
        session,
        where=_BOXES_ON_NAMED,
        to=MandelboxStatus.EXITED,
        reason=EndReason.INSTANCE_TERMINATED,
        actor=ACTOR,
        now=now,
        params={"p_names": names},
    )
    result.actions += move(
        session,
        where=_NAMED,
        to=InstanceStatus.TERMINATED,
        action="terminated",
        reason="confirmed_gone",
        now=now,
        row_detail={name: {"cloud_provider_id": cloud_id} for name, cloud_id in gone.items()},
        values=_GONE_VALUES,
        params={"p_names": names, "p_now": now},
    )
    result.actions += [
        ScalerAction("mandelbox_ended", box.instance_name, detail={"mandelbox_id": str(box.mandelbox_id)})
        for box in ended
    ]
    return result


# terminate_in_cloud's read, built once (it runs every pass).
_TERMINATING_READ = DriverStatement(
    select(
        _instances.c.instance_name, _instances.c.region, _instances.c.cloud_provider_id, _instances.c.status_changed_at
    )
    .where(_instances.c.status == InstanceStatus.TERMINATING)
    .order_by(_instances.c.region, _instances.c.instance_name)
)


def _terminate_region(
    cloud: CloudProvider, region: str, rows: Sequence[Any], *, now: datetime
) -> dict[str, str | None]:
    """Describe, terminate what still runs, describe again; returns name → provider id of confirmed-gone rows."""
    refs = [HostRef(row.instance_name, row.cloud_provider_id) for row in rows]
    hosts = _group(cloud.describe(region, refs), rows)
    running = sorted(h.cloud_provider_id for found in hosts.values() for h in found if not h.gone)
    if running:
        cloud.terminate(region, running)
        hosts = _group(cloud.describe(region, refs), rows)
    grace_cutoff = now - timedelta(seconds=LAUNCH_VISIBILITY_GRACE_S)
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
