"""The scaler's buffer maths as pure functions: snapshots in, a plan out. No database, no cloud, no clock (the pass's
``now`` and the measured demand come in as arguments)."""

from __future__ import annotations

import enum
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from fractal.fleet.instances import DRAINABLE_STATUSES
from fractal.models import InstanceStatus

# Statuses that still occupy a machine in the cloud, hence count against the per-region maximum.
OCCUPYING_STATUSES = frozenset(
    {
        InstanceStatus.PRE_CONNECTION,
        InstanceStatus.ACTIVE,
        InstanceStatus.DRAINING,
        InstanceStatus.TERMINATING,
        InstanceStatus.LOST,
    }
)
# plan_fleet tests "not TERMINATED" by identity rather than membership in OCCUPYING_STATUSES: the same set
# (test_scaling_policy checks that it stays so when a status is added).


class DrainReason(enum.StrEnum):
    SPARE = "spare"
    INACTIVE_IMAGE = "inactive_image"


class BufferKind(enum.StrEnum):
    STATIC = "static"  # target_free (or the settings default)
    DEMAND = "demand"  # recent arrival rate x measured launch lead time x safety factor


@dataclass(frozen=True)
class ScheduledMinimum:
    """At least ``min_free`` free slots during these UTC hours (0-23)."""

    hours_utc: tuple[int, ...]
    min_free: int


@dataclass(frozen=True)
class BufferPolicy:
    """An image's ``buffer_policy``: how its free-slot target is chosen (None on the image means static)."""

    kind: BufferKind = BufferKind.STATIC
    safety_factor: float = 1.5
    window_s: float = 900.0  # the arrival rate is measured over this long
    floor: int = 0
    ceiling: int = 100
    default_lead_time_s: float = 180.0  # until a launch has been measured in the region
    schedule: tuple[ScheduledMinimum, ...] = ()

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> BufferPolicy:
        """From the stored JSON (validated by the admin API's schema)."""
        return cls(
            kind=BufferKind(value.get("kind", BufferKind.STATIC)),
            safety_factor=float(value.get("safety_factor", 1.5)),
            window_s=float(value.get("window_s", 900.0)),
            floor=int(value.get("floor", 0)),
            ceiling=int(value.get("ceiling", 100)),
            default_lead_time_s=float(value.get("default_lead_time_s", 180.0)),
            schedule=tuple(
                ScheduledMinimum(tuple(int(h) for h in item["hours_utc"]), int(item["min_free"]))
                for item in value.get("schedule", ())
            ),
        )


@dataclass(frozen=True)
class DemandStats:
    """What the scaler measured for one image: distinct users asking in the last ``window_s`` seconds, and the
    median launch-to-ACTIVE time of the region's recent launches (None before any was measured)."""

    arrivals: int
    window_s: float
    lead_time_s: float | None = None


@dataclass(frozen=True)
class ImageTarget:
    """An image as the policy sees it; ``target_free`` is None when the settings default applies."""

    region: str
    client_commit_hash: str
    ami_id: str
    instance_type: str
    mandelbox_capacity: int
    active: bool = True
    target_free: int | None = None
    buffer_policy: BufferPolicy | None = None
    demand: DemandStats | None = None
    waiting: int = 0  # users refused for lack of room just now and retrying: they need slots beyond the target


@dataclass(frozen=True)
class TargetDecision:
    """The free-slot target of one image and why: ``reason`` is ``static``, ``demand``, ``floor``, ``ceiling`` or
    ``schedule`` (which bound or rule decided); ``detail`` holds the inputs."""

    target: int
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)


class InstanceSnapshot(NamedTuple):
    """One instance row. ``idle_since``: when it last became empty (or usable, when never used); the scaler's fleet
    read gives it for empty ACTIVE hosts only (the only ones ``spare_to_drain`` looks at), None for the others.

    A named tuple, not a frozen dataclass: the fleet read makes one per instance every pass, and a frozen
    dataclass's constructor costs three times as much."""

    instance_name: str
    region: str
    client_commit_hash: str
    status: InstanceStatus
    mandelbox_capacity: int
    live_mandelboxes: int = 0
    idle_since: datetime | None = None


class BusyHosts(NamedTuple):
    """The ACTIVE hosts of one (region, version) that has an active image and that carry a live mandelbox, summed.

    The policy only counts such hosts (their free slots, the machines they occupy): it drains a host one by one only
    when it is empty or its version has no active image. The scaler's fleet read therefore sums them in SQL (most of
    a fleet, every pass) instead of reading them row by row; plan_fleet gives the same plan either way."""

    region: str
    client_commit_hash: str
    hosts: int
    free: int  # the sum of max(0, capacity - live) over the hosts


@dataclass(frozen=True)
class LaunchPlan:
    region: str
    client_commit_hash: str
    ami_id: str
    instance_type: str
    mandelbox_capacity: int
    count: int
    free: int
    target_free: int
    wanted: int  # before the per-region cap
    target_reason: str = "static"
    waiting: int = 0  # users waiting after a 503, covered on top of the target


@dataclass(frozen=True)
class DrainPlan:
    instance_name: str
    region: str
    client_commit_hash: str
    reason: DrainReason


@dataclass(frozen=True)
class FleetPlan:
    launches: tuple[LaunchPlan, ...]
    drains: tuple[DrainPlan, ...]
    # (region, client_commit_hash) -> the target each active image was given this pass, and why.
    targets: dict[tuple[str, str], TargetDecision] = field(default_factory=dict)


def static_target(image: ImageTarget, default_target_free: int) -> int:
    """The image's own target when set, else FRACTAL_TARGET_FREE_MANDELBOXES."""
    return default_target_free if image.target_free is None else image.target_free


def decide_target(image: ImageTarget, default_target_free: int, *, now: datetime) -> TargetDecision:
    """The image's free-slot target at ``now``, and why.

    Static (no ``buffer_policy``, or kind ``static``): ``target_free``, else the settings default. Demand:
    ceil(arrivals / window x lead time x safety factor), clamped to [floor, ceiling]. Either way a scheduled
    minimum for the current UTC hour raises it.
    """
    policy = image.buffer_policy
    base = static_target(image, default_target_free)
    if policy is None:
        return TargetDecision(base, "static", {"target_free": base})
    detail: dict[str, Any]
    if policy.kind is BufferKind.DEMAND:
        demand = image.demand or DemandStats(arrivals=0, window_s=policy.window_s)
        measured = demand.lead_time_s is not None
        lead = demand.lead_time_s if demand.lead_time_s is not None else policy.default_lead_time_s
        rate = demand.arrivals / demand.window_s if demand.window_s > 0 else 0.0
        raw = rate * lead * policy.safety_factor
        wanted = math.ceil(raw - 1e-9)
        target, reason = max(policy.floor, min(policy.ceiling, wanted)), "demand"
        if wanted < policy.floor:
            reason = "floor"
        elif wanted > policy.ceiling:
            reason = "ceiling"
        detail = {
            "arrivals": demand.arrivals,
            "window_s": demand.window_s,
            "arrival_rate_per_s": round(rate, 6),
            "lead_time_s": round(lead, 3),
            "lead_time_measured": measured,
            "safety_factor": policy.safety_factor,
            "floor": policy.floor,
            "ceiling": policy.ceiling,
            "demand_target": wanted,
        }
    else:
        target, reason, detail = base, "static", {"target_free": base}
    hour = now.hour
    scheduled = max((m.min_free for m in policy.schedule if hour in m.hours_utc), default=None)
    if scheduled is not None:
        detail["scheduled_min_free"] = scheduled
        if scheduled > target:
            target, reason = scheduled, "schedule"
    return TargetDecision(target, reason, detail)


def free_slots(instances: Iterable[InstanceSnapshot], *, region: str, client_commit_hash: str) -> int:
    """Free slots of one (region, version): room on ACTIVE hosts plus the whole capacity of booting ones.

    Booting (PRE_CONNECTION) capacity counts so that a pass never launches again for a deficit it already covered;
    DRAINING, LOST and TERMINATING hosts take no new work, so they never count.
    """
    free = 0
    for instance in instances:
        if instance.region != region or instance.client_commit_hash != client_commit_hash:
            continue
        if instance.status is InstanceStatus.ACTIVE:
            free += max(0, instance.mandelbox_capacity - instance.live_mandelboxes)
        elif instance.status is InstanceStatus.PRE_CONNECTION:
            free += instance.mandelbox_capacity
    return free


def instances_needed(*, free: int, target_free: int, capacity_per_instance: int) -> int:
    """ceil(deficit / capacity): the fewest new hosts that bring free slots back to the target."""
    deficit = target_free - free
    if deficit <= 0 or capacity_per_instance <= 0:
        return 0
    return math.ceil(deficit / capacity_per_instance)


def spare_to_drain(
    candidates: Sequence[InstanceSnapshot],
    *,
    free: int,
    target_free: int,
    now: datetime,
    scale_down_delay_s: float,
) -> list[InstanceSnapshot]:
    """Empty ACTIVE hosts to drain: idle for the cool-down, longest idle first, only while the rest still meet the
    target. Less than one host's worth of spare therefore always stays (no launch/drain flapping)."""
    cutoff = now - timedelta(seconds=scale_down_delay_s)
    idle = sorted(
        (
            c
            for c in candidates
            if c.status is InstanceStatus.ACTIVE
            and c.live_mandelboxes == 0
            and c.idle_since is not None
            and c.idle_since <= cutoff
        ),
        key=lambda c: (c.idle_since, c.instance_name),
    )
    excess = free - target_free
    chosen: list[InstanceSnapshot] = []
    for candidate in idle:
        if excess - candidate.mandelbox_capacity < 0:
            continue  # a smaller host further on may still fit
        chosen.append(candidate)
        excess -= candidate.mandelbox_capacity
    return chosen


def plan_fleet(
    images: Sequence[ImageTarget],
    instances: Sequence[InstanceSnapshot],
    *,
    now: datetime,
    default_target_free: int,
    max_instances_per_region: int,
    scale_down_delay_s: float,
    busy: Sequence[BusyHosts] = (),
) -> FleetPlan:
    """Launches and drains that bring every active image to its free-slot target.

    The fleet is ``instances`` one by one plus ``busy``: busy ACTIVE hosts of active images, summed per (region,
    version) (see ``BusyHosts``; a host is in one or the other, never both).

    Per active image (region, version): free slots less the users waiting after a 503; launch
    ceil(deficit / capacity) hosts, never beyond the per-region maximum
    (occupied machines of every version count, launches planned earlier in this pass too); drain spare empty hosts
    after the cool-down. Every ACTIVE or PRE_CONNECTION host whose version has no active image in its region drains.
    """
    # One walk over the fleet: each (region, version)'s hosts, free slots (``free_slots``' sum, per key) and empty
    # ACTIVE hosts with an idle time (the only ones ``spare_to_drain`` can choose, in fleet order), and each region's
    # occupied machines. Statuses are compared by identity: a set lookup hashes the enum member in Python, once per
    # host every pass.
    by_key: dict[tuple[str, str], list[InstanceSnapshot]] = defaultdict(list)
    idle_by_key: dict[tuple[str, str], list[InstanceSnapshot]] = defaultdict(list)
    free_by_key: Counter[tuple[str, str]] = Counter()
    occupied: Counter[str] = Counter()
    active, booting, not_occupying = InstanceStatus.ACTIVE, InstanceStatus.PRE_CONNECTION, InstanceStatus.TERMINATED
    for instance in instances:
        key = (instance.region, instance.client_commit_hash)
        by_key[key].append(instance)
        status = instance.status
        if status is active:
            if instance.mandelbox_capacity > instance.live_mandelboxes:
                free_by_key[key] += instance.mandelbox_capacity - instance.live_mandelboxes
            if instance.live_mandelboxes == 0 and instance.idle_since is not None:
                idle_by_key[key].append(instance)
        elif status is booting:
            free_by_key[key] += instance.mandelbox_capacity
        if status is not not_occupying:
            occupied[instance.region] += 1
    for group in busy:
        free_by_key[(group.region, group.client_commit_hash)] += group.free
        occupied[group.region] += group.hosts

    active_images = [image for image in images if image.active]
    active_keys = {(image.region, image.client_commit_hash) for image in active_images}
    launches: list[LaunchPlan] = []
    drains: list[DrainPlan] = []
    targets: dict[tuple[str, str], TargetDecision] = {}
    for image in active_images:
        key = (image.region, image.client_commit_hash)
        decision = decide_target(image, default_target_free, now=now)
        targets[key] = decision
        target = decision.target
        # Users retrying after a 503 will take free slots (booting ones included) before anyone new: not spare.
        raw_free = free_by_key[key]  # free_slots() of the key's hosts and its busy groups, summed above
        free = raw_free - image.waiting
        wanted = instances_needed(free=free, target_free=target, capacity_per_instance=image.mandelbox_capacity)
        if wanted > 0:
            count = min(wanted, max(0, max_instances_per_region - occupied[image.region]))
            occupied[image.region] += count
            launches.append(
                LaunchPlan(
                    region=image.region,
                    client_commit_hash=image.client_commit_hash,
                    ami_id=image.ami_id,
                    instance_type=image.instance_type,
                    mandelbox_capacity=image.mandelbox_capacity,
                    count=count,
                    free=raw_free,
                    target_free=target,
                    wanted=wanted,
                    target_reason=decision.reason,
                    waiting=image.waiting,
                )
            )
            continue
        for spare in spare_to_drain(
            idle_by_key.get(key, []), free=free, target_free=target, now=now, scale_down_delay_s=scale_down_delay_s
        ):
            drains.append(DrainPlan(spare.instance_name, spare.region, spare.client_commit_hash, DrainReason.SPARE))

    for key, fleet in sorted(by_key.items()):
        if key in active_keys:
            continue
        for instance in sorted(fleet, key=lambda i: i.instance_name):
            if instance.status in DRAINABLE_STATUSES:
                drains.append(
                    DrainPlan(
                        instance.instance_name, instance.region, instance.client_commit_hash, DrainReason.INACTIVE_IMAGE
                    )
                )
    return FleetPlan(launches=tuple(launches), drains=tuple(drains), targets=targets)
