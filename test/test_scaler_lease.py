"""The scaler's leadership is a lease row with a fencing token: compare-and-set, expiry on the database clock,
and a former leader fenced off from acting or recording after its lease passed on."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from sqlalchemy import event, select

from fractal.clock import database_now
from fractal.cloud.base import LaunchedHost, LaunchRequest
from fractal.cloud.memory import MemoryCloud
from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.events import EventKind
from fractal.models import Event, Image, Instance, InstanceStatus
from fractal.scaling import steps
from fractal.scaling.lease import LeaseLost, acquire_lease, check_lease, release_lease
from fractal.scaling.policy import LaunchPlan
from fractal.scaling.reconcile import PENDING_PREFIX, reconcile_fleet

NAME = "test-lease"
PLAN = LaunchPlan("us-east-1", "v1", "ami-1", "t3", mandelbox_capacity=2, count=2, free=0, target_free=4, wanted=2)


def test_one_holder_at_a_time_renewals_keep_the_token_new_holders_get_a_new_one(
    committed_factory: SessionFactory,
) -> None:
    with committed_factory() as session:
        first = acquire_lease(session, name=NAME, holder="a", ttl_s=30)
        assert first is not None and first.fencing_token == 1
        assert acquire_lease(session, name=NAME, holder="b", ttl_s=30) is None  # held by a
        renewed = acquire_lease(session, name=NAME, holder="a", ttl_s=30)
        assert renewed is not None and renewed.fencing_token == 1
        release_lease(session, first)
        second = acquire_lease(session, name=NAME, holder="b", ttl_s=30)
        assert second is not None and second.fencing_token == 2
        with pytest.raises(LeaseLost):
            check_lease(session, first)
        check_lease(session, second)


def test_an_expired_lease_passes_on_within_its_period(committed_factory: SessionFactory) -> None:
    with committed_factory() as session:
        stale = acquire_lease(session, name=NAME, holder="a", ttl_s=0.5)
        assert stale is not None
        assert acquire_lease(session, name=NAME, holder="b", ttl_s=30) is None
        time.sleep(0.7)
        fresh = acquire_lease(session, name=NAME, holder="b", ttl_s=30)
        assert fresh is not None and fresh.fencing_token == stale.fencing_token + 1
        with pytest.raises(LeaseLost):
            check_lease(session, stale)


def test_a_stale_leader_asks_the_cloud_for_nothing(committed_factory: SessionFactory, settings: Settings) -> None:
    cloud = MemoryCloud()
    with committed_factory() as session:
        stale = acquire_lease(session, name=NAME, holder="paused", ttl_s=0.3)
        assert stale is not None
        time.sleep(0.5)
        assert acquire_lease(session, name=NAME, holder="successor", ttl_s=30) is not None
        with pytest.raises(LeaseLost):
            steps.launch(session, cloud, [PLAN], settings=settings, now=database_now(session), lease=stale)
    assert cloud.launches == []  # nothing reached the cloud; the rows it made are cleaned up as unconfirmed


class SlowCloud(MemoryCloud):
    """A cloud that answers after the caller's lease has run out (a paused or partitioned leader)."""

    def __init__(self, delay_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delay_s = delay_s

    def launch(self, request: LaunchRequest) -> LaunchedHost:
        host = super().launch(request)  # sent in time,
        time.sleep(self.delay_s)  # answered late
        return host


def test_a_leader_whose_lease_ran_out_mid_call_records_nothing(
    committed_factory: SessionFactory, settings: Settings
) -> None:
    cloud = SlowCloud(delay_s=0.6)
    with committed_factory() as session:
        lease = acquire_lease(session, name=NAME, holder="slow", ttl_s=0.5)
        assert lease is not None
        with pytest.raises(LeaseLost):  # the second launch's check finds the lease gone
            steps.launch(session, cloud, [PLAN], settings=settings, now=database_now(session), lease=lease)
        session.rollback()
        ids = session.scalars(select(Instance.cloud_provider_id)).all()
    assert len(cloud.launches) == 1
    assert all((cloud_id or "").startswith(PENDING_PREFIX) for cloud_id in ids), ids  # the fence held


def test_concurrent_passes_take_turns_through_the_lease(committed_factory: SessionFactory, settings: Settings) -> None:
    import threading

    with committed_factory() as session:
        session.add(
            Image(
                region="us-east-1",
                client_commit_hash="v1",
                ami_id="ami-1",
                active=True,
                instance_type="t3",
                mandelbox_capacity=2,
                target_free=8,
            )
        )
        session.commit()
    cloud = SlowCloud(delay_s=0.05)
    reports: list[Any] = []
    barrier = threading.Barrier(4)

    def one_pass() -> None:
        barrier.wait()
        reports.append(reconcile_fleet(committed_factory, settings=settings, cloud=cloud))

    threads = [threading.Thread(target=one_pass) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    ran = [r for r in reports if r.ran]
    assert len(reports) == 4 and len(ran) >= 1
    assert {r.skipped_reason for r in reports if not r.ran} <= {"another scaler holds the lease"}
    with committed_factory() as session:
        live = session.scalars(select(Instance).where(Instance.status == InstanceStatus.PRE_CONNECTION)).all()
    assert len(live) == 4 and len(cloud.launches) == 4  # target 8 / capacity 2: launched once, not per pass


def test_a_pass_longer_than_its_lease_keeps_it_by_renewing_before_each_call(
    committed_factory: SessionFactory, settings: Settings
) -> None:
    cloud = SlowCloud(delay_s=0.25)
    plan = LaunchPlan("us-east-1", "v1", "ami-1", "t3", mandelbox_capacity=1, count=5, free=0, target_free=5, wanted=5)
    with committed_factory() as session:
        lease = acquire_lease(session, name=NAME, holder="long-pass", ttl_s=0.6)
        assert lease is not None
        # Five launches take ~1.25 s, twice the lease period: each renewal keeps the lease for one more period.
        result = steps.launch(session, cloud, [plan], settings=settings, now=database_now(session), lease=lease)
        assert acquire_lease(session, name=NAME, holder="rival", ttl_s=30) is None  # still held after the pass
        ids = session.scalars(select(Instance.cloud_provider_id)).all()
    assert len(cloud.launches) == 5
    assert [a.action for a in result.actions] == ["launch"] * 5
    assert not any((cloud_id or "").startswith(PENDING_PREFIX) for cloud_id in ids), ids


class TakenOverCloud(MemoryCloud):
    """A cloud whose answer comes after the caller's lease expired and a successor took it."""

    def __init__(self, factory: SessionFactory, delay_s: float) -> None:
        super().__init__()
        self.factory = factory
        self.delay_s = delay_s
        self.successor: Any = None

    def launch(self, request: LaunchRequest) -> LaunchedHost:
        host = super().launch(request)
        time.sleep(self.delay_s)
        with self.factory() as other:
            self.successor = acquire_lease(other, name=NAME, holder="successor", ttl_s=30)
        return host


def test_what_a_replaced_leader_learns_from_the_cloud_is_not_recorded(
    committed_factory: SessionFactory, settings: Settings
) -> None:
    cloud = TakenOverCloud(committed_factory, delay_s=0.5)
    one = LaunchPlan("us-east-1", "v1", "ami-1", "t3", mandelbox_capacity=1, count=1, free=0, target_free=1, wanted=1)
    with committed_factory() as session:
        lease = acquire_lease(session, name=NAME, holder="paused", ttl_s=0.3)
        assert lease is not None
        with pytest.raises(LeaseLost):  # the recording transaction's fence
            steps.launch(session, cloud, [one], settings=settings, now=database_now(session), lease=lease)
        session.rollback()
        assert cloud.successor is not None and cloud.successor.fencing_token == lease.fencing_token + 1
        ids = session.scalars(select(Instance.cloud_provider_id)).all()
        kinds = session.scalars(select(Event.kind)).all()
    assert len(cloud.launches) == 1
    assert all((cloud_id or "").startswith(PENDING_PREFIX) for cloud_id in ids), ids  # left for the successor
    assert EventKind.INSTANCE_LAUNCHED not in kinds  # not even the event of the launch it saw


def test_ec2_requests_past_the_lease_end_are_not_sent(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    """The deadline is checked in botocore's before-send hook: a leader stalled between its renewal and its
    request (SIGSTOP, a long pause) does not launch or terminate when it wakes."""
    import boto3

    from fractal.cloud.base import DeadlinePassed, HostRef, send_deadline
    from fractal.cloud.ec2 import Ec2Cloud

    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", moto_endpoint)
    cloud = Ec2Cloud(settings, max_attempts=1)
    commit = f"deadline-{uuid.uuid4().hex[:8]}"

    def request(name: str) -> LaunchRequest:
        return LaunchRequest(name, "us-east-1", commit, "ami-12345678", "t3.micro", 1, "s3cret", "http://h")

    with send_deadline(time.monotonic() - 0.01), pytest.raises(DeadlinePassed) as refused:
        cloud.launch(request(f"late-{commit}"))
    assert refused.value.maybe_done is False and refused.value.code == "DeadlinePassed"
    with send_deadline(time.monotonic() + 30):
        launched = cloud.launch(request(f"on-time-{commit}"))
    with send_deadline(time.monotonic() - 0.01), pytest.raises(DeadlinePassed):
        cloud.terminate("us-east-1", [launched.cloud_provider_id])
    # describe is a read: never refused
    with send_deadline(time.monotonic() - 0.01):
        hosts = cloud.describe("us-east-1", [HostRef(f"on-time-{commit}", launched.cloud_provider_id)])
    assert [h.state.value for h in hosts] in (["running"], ["pending"])

    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_endpoint)
    found = ec2.describe_instances(Filters=[{"Name": "tag:fractal:client-commit-hash", "Values": [commit]}])
    names = {
        next(t["Value"] for t in i["Tags"] if t["Key"] == "fractal:instance-name"): i["State"]["Name"]
        for r in found["Reservations"]
        for i in r["Instances"]
    }
    assert names == {f"on-time-{commit}": names[f"on-time-{commit}"]}  # the late launch never reached EC2
    assert names[f"on-time-{commit}"] in ("pending", "running")  # nor did the late terminate


def test_check_lease_gives_the_instant_the_lease_certainly_holds_until(committed_factory: SessionFactory) -> None:
    with committed_factory() as session:
        lease = acquire_lease(session, name=NAME, holder="a", ttl_s=5)
        assert lease is not None
        before = time.monotonic()
        deadline = check_lease(session, lease)
        assert before + 4 <= deadline <= time.monotonic() + 5 - 0.5


def test_a_step_renews_once_while_more_than_half_the_period_is_left(
    committed_factory: SessionFactory, settings: Settings
) -> None:
    """check_lease with the step's previous deadline: five launches under a 30 s lease send one renewal (the lease
    cannot be taken before it expires, so more would only move its end); under a 0.4 s lease with calls 0.25 s apart
    every call renews, and the lease stays held past the step."""

    def renewals_during(lease_ttl_s: float, cloud: MemoryCloud) -> tuple[int, Any]:
        with committed_factory() as session:
            lease = acquire_lease(session, name=NAME, holder=f"h-{lease_ttl_s}", ttl_s=lease_ttl_s)
            assert lease is not None
            seen: list[str] = []
            engine = session.get_bind()
            listener = lambda *args: seen.append(args[2])  # noqa: E731 (before_cursor_execute's statement)
            event.listen(engine, "before_cursor_execute", listener)
            try:
                plan = LaunchPlan("us-east-1", "v1", "ami-1", "t3", 1, count=5, free=0, target_free=5, wanted=5)
                result = steps.launch(session, cloud, [plan], settings=settings, now=database_now(session), lease=lease)
            finally:
                event.remove(engine, "before_cursor_execute", listener)
            assert [a.action for a in result.actions] == ["launch"] * 5
            held_after = acquire_lease(session, name=NAME, holder="rival", ttl_s=30) is None
            release_lease(session, lease)
        return sum(1 for sql in seen if sql.lstrip().upper().startswith("UPDATE LEASES")), held_after

    assert renewals_during(30, MemoryCloud()) == (1, True)
    assert renewals_during(0.4, SlowCloud(delay_s=0.25)) == (5, True)
