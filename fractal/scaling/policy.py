"""The scaler's buffer maths as pure functions: snapshots in, a plan out. No database, no cloud, no clock."""

from __future__ import annotations

import enum
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

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


class DrainReason(enum.StrEnum):
    SPARE = "spare"
    INACTIVE_IMAGE = "inactive_image"


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


@dataclass(frozen=True)
class InstanceSnapshot:
    """One instance row. ``idle_since``: when it last became empty (or usable, when never used)."""

    instance_name: str
    region: str
    client_commit_hash: str
    status: InstanceStatus
    mandelbox_capacity: int
    live_mandelboxes: int = 0
    idle_since: datetime | None = None


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


def effective_target(image: ImageTarget, default_target_free: int) -> int:
    """The image's own target when set, else FRACTAL_TARGET_FREE_MANDELBOXES."""
    return default_target_free if image.target_free is None else image.target_free


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
) -> FleetPlan:
    """Launches and drains that bring every active image to its free-slot target.

    Per active image (region, version): launch ceil(deficit / capacity) hosts, never beyond the per-region maximum
    (occupied machines of every version count, launches planned earlier in this pass too); drain spare empty hosts
    after the cool-down. Every ACTIVE or PRE_CONNECTION host whose version has no active image in its region drains.
    """
    by_key: dict[tuple[str, str], list[InstanceSnapshot]] = defaultdict(list)
    occupied: Counter[str] = Counter()
    for instance in instances:
        by_key[(instance.region, instance.client_commit_hash)].append(instance)
        if instance.status in OCCUPYING_STATUSES:
            occupied[instance.region] += 1

    active = [image for image in images if image.active]
    active_keys = {(image.region, image.client_commit_hash) for image in active}
    launches: list[LaunchPlan] = []
    drains: list[DrainPlan] = []
    for image in active:
        key = (image.region, image.client_commit_hash)
        fleet = by_key.get(key, [])
        target = effective_target(image, default_target_free)
        free = free_slots(fleet, region=image.region, client_commit_hash=image.client_commit_hash)
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
                    free=free,
                    target_free=target,
                    wanted=wanted,
                )
            )
            continue
        for spare in spare_to_drain(
            fleet, free=free, target_free=target, now=now, scale_down_delay_s=scale_down_delay_s
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
    return FleetPlan(launches=tuple(launches), drains=tuple(drains))
