"""The buffer maths, including Whist's scaling-algorithm buffer cases, as pure-function tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fractal.models import InstanceStatus
from fractal.scaling.policy import (
    BusyHosts,
    DrainReason,
    ImageTarget,
    InstanceSnapshot,
    free_slots,
    instances_needed,
    plan_fleet,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
LONG_AGO = NOW - timedelta(hours=1)
S = InstanceStatus


def image(**kw: Any) -> ImageTarget:
    values: dict[str, Any] = {
        "region": "us-east-1",
        "client_commit_hash": "v1",
        "ami_id": "ami-1",
        "instance_type": "g4dn.xlarge",
        "mandelbox_capacity": 4,
    }
    values.update(kw)
    return ImageTarget(**values)


_n = iter(range(10**6))


def host(status: InstanceStatus = S.ACTIVE, live: int = 0, cap: int = 4, **kw: Any) -> InstanceSnapshot:
    values: dict[str, Any] = {
        "instance_name": f"h{next(_n):04d}",
        "region": "us-east-1",
        "client_commit_hash": "v1",
        "status": status,
        "mandelbox_capacity": cap,
        "live_mandelboxes": live,
        "idle_since": LONG_AGO if live == 0 else None,
    }
    values.update(kw)
    return InstanceSnapshot(**values)


def plan(images: list[ImageTarget], hosts: list[InstanceSnapshot], target: int = 10, **kw: Any) -> Any:
    options: dict[str, Any] = {"max_instances_per_region": 100, "scale_down_delay_s": 300}
    options.update(kw)
    return plan_fleet(images, hosts, now=NOW, default_target_free=target, **options)


# --- Whist's buffer cases -------------------------------------------------------------------------------
def test_empty_fleet_launches_enough_for_the_target() -> None:
    result = plan([image()], [], target=10)
    assert [(p.count, p.free, p.target_free) for p in result.launches] == [(3, 0, 10)]  # ceil(10 / 4)


def test_part_full_instance_counts_its_free_slots() -> None:
    result = plan([image()], [host(live=1)], target=10)  # 3 free, deficit 7 → 2 hosts
    assert [(p.count, p.free) for p in result.launches] == [(2, 3)]


def test_exactly_at_target_does_nothing() -> None:
    result = plan([image()], [host(live=2), host(live=0), host(live=0)], target=10)  # 2 + 4 + 4 free
    assert result.launches == () and result.drains == ()


def test_over_full_fleet_with_no_free_slot_launches() -> None:
    result = plan([image()], [host(live=4), host(live=4)], target=4)
    assert [p.count for p in result.launches] == [1]


def test_free_slots_split_over_instances_add_up() -> None:
    hosts = [host(live=3), host(live=2), host(live=1), host(live=3)]  # 1 + 2 + 3 + 1 = 7 free
    assert free_slots(hosts, region="us-east-1", client_commit_hash="v1") == 7
    assert [p.count for p in plan([image()], hosts, target=10).launches] == [1]


def test_draining_lost_and_terminating_instances_do_not_count() -> None:
    hosts = [host(S.DRAINING), host(S.LOST), host(S.TERMINATING), host(S.TERMINATED)]
    assert free_slots(hosts, region="us-east-1", client_commit_hash="v1") == 0
    assert [p.count for p in plan([image()], hosts, target=4).launches] == [1]


def test_booting_instances_count_so_nothing_is_launched_twice() -> None:
    hosts = [host(S.PRE_CONNECTION), host(S.PRE_CONNECTION), host(S.PRE_CONNECTION)]
    assert free_slots(hosts, region="us-east-1", client_commit_hash="v1") == 12
    assert plan([image()], hosts, target=10).launches == ()


def test_buffer_is_region_sensitive() -> None:
    hosts = [host(region="eu-west-1"), host(region="eu-west-1"), host(region="eu-west-1")]
    result = plan([image(), image(region="eu-west-1")], hosts, target=10)
    assert [(p.region, p.count) for p in result.launches] == [("us-east-1", 3)]


def test_instances_of_another_image_do_not_count() -> None:
    hosts = [host(client_commit_hash="v0"), host(client_commit_hash="v0"), host(client_commit_hash="v0")]
    assert free_slots(hosts, region="us-east-1", client_commit_hash="v1") == 0
    result = plan([image()], hosts, target=10)
    assert [(p.client_commit_hash, p.count) for p in result.launches] == [("v1", 3)]
    # v0 has no active image: its hosts drain.
    assert {d.reason for d in result.drains} == {DrainReason.INACTIVE_IMAGE} and len(result.drains) == 3


# --- targets, bounds, scale-down ------------------------------------------------------------------------
def test_image_target_overrides_the_default() -> None:
    assert [p.count for p in plan([image(target_free=1)], [], target=10).launches] == [1]
    assert plan([image(target_free=0)], [], target=10).launches == ()


@pytest.mark.parametrize(
    ("free", "target", "cap", "want"), [(0, 10, 4, 3), (9, 10, 4, 1), (10, 10, 4, 0), (0, 1, 8, 1)]
)
def test_instances_needed_is_ceil_of_deficit(free: int, target: int, cap: int, want: int) -> None:
    assert instances_needed(free=free, target_free=target, capacity_per_instance=cap) == want


def test_launches_never_exceed_the_region_maximum() -> None:
    hosts = [host(live=4), host(S.DRAINING), host(S.LOST)]
    result = plan([image(), image(client_commit_hash="v2")], hosts, target=40, max_instances_per_region=5)
    assert sum(p.count for p in result.launches) == 2  # 3 machines occupy the region already
    assert result.launches[0].wanted == 10


def test_empty_instances_beyond_one_instance_of_spare_drain_after_the_cool_down() -> None:
    hosts = [host(live=0) for _ in range(5)]  # 20 free, target 10 → two hosts are spare
    result = plan([image()], hosts, target=10)
    assert len(result.drains) == 2 and {d.reason for d in result.drains} == {DrainReason.SPARE}
    # Not yet idle long enough: nothing drains.
    recent = [host(live=0, idle_since=NOW - timedelta(seconds=60)) for _ in range(5)]
    assert plan([image()], recent, target=10).drains == ()


def test_less_than_one_instance_of_spare_stays() -> None:
    hosts = [host(live=0), host(live=0), host(live=1)]  # 11 free, target 8: draining any leaves 7
    assert plan([image()], hosts, target=8).drains == ()


def test_busy_instances_are_never_drained_as_spare() -> None:
    hosts = [host(live=1) for _ in range(10)]
    assert plan([image()], hosts, target=0).drains == ()


def test_every_instance_of_an_inactive_image_drains() -> None:
    hosts = [host(live=2), host(S.PRE_CONNECTION), host(S.DRAINING), host(live=0)]
    result = plan([image(active=False)], hosts, target=10)
    assert result.launches == ()
    assert sorted(d.instance_name for d in result.drains) == sorted(h.instance_name for h in hosts[:2] + hosts[3:])


def test_every_status_but_terminated_occupies_a_machine() -> None:
    """plan_fleet counts occupied machines as "not TERMINATED" (by identity, the hot path): that must be exactly
    OCCUPYING_STATUSES, also when a status is added."""
    from fractal.models import InstanceStatus
    from fractal.scaling.policy import OCCUPYING_STATUSES

    assert frozenset(InstanceStatus) - {InstanceStatus.TERMINATED} == OCCUPYING_STATUSES


# --- busy hosts summed (the scaler's fleet read) --------------------------------------------------------------

_fleet_host = st.builds(
    lambda status, region, commit, cap, live, idle_min: (status, region, commit, cap, min(live, cap + 1), idle_min),
    st.sampled_from(list(S)),
    st.sampled_from(["us-east-1", "eu-west-1"]),
    st.sampled_from(["v1", "v2", "v3"]),
    st.integers(1, 6),
    st.integers(0, 7),  # up to one over capacity: a host's count is what it reports
    st.integers(0, 20),
)


@settings(max_examples=300, deadline=None)
@given(
    fleet=st.lists(_fleet_host, max_size=30),
    active=st.sets(st.sampled_from([(r, c) for r in ("us-east-1", "eu-west-1") for c in ("v1", "v2", "v3")])),
    target=st.integers(0, 12),
    max_per_region=st.integers(0, 12),
)
def test_busy_hosts_summed_give_the_plan_they_give_one_by_one(
    fleet: list[tuple[Any, ...]], active: set[tuple[str, str]], target: int, max_per_region: int
) -> None:
    """The fleet read sums the busy ACTIVE hosts of active images (``BusyHosts``) instead of reading them one by one:
    whatever the fleet, plan_fleet gives the same launches, drains and targets either way."""
    images = [
        image(region=r, client_commit_hash=c, active=(r, c) in active)
        for r in ("us-east-1", "eu-west-1")
        for c in ("v1", "v2", "v3")
    ]
    hosts = [
        host(
            status,
            live,
            cap,
            region=region,
            client_commit_hash=commit,
            idle_since=NOW - timedelta(minutes=idle) if status is S.ACTIVE and live == 0 else None,
        )
        for status, region, commit, cap, live, idle in fleet
    ]

    def summed(h: InstanceSnapshot) -> bool:
        return h.status is S.ACTIVE and h.live_mandelboxes > 0 and (h.region, h.client_commit_hash) in active

    groups: dict[tuple[str, str], list[InstanceSnapshot]] = {}
    for h in hosts:
        if summed(h):
            groups.setdefault((h.region, h.client_commit_hash), []).append(h)
    busy = [
        BusyHosts(r, c, len(members), sum(max(0, m.mandelbox_capacity - m.live_mandelboxes) for m in members))
        for (r, c), members in groups.items()
    ]
    options = {"target": target, "max_instances_per_region": max_per_region}
    one_by_one = plan(images, hosts, **options)
    with_groups = plan(images, [h for h in hosts if not summed(h)], busy=busy, **options)
    assert with_groups == one_by_one
