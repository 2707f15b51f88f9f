"""Reconcile passes against real Postgres with an in-memory cloud: launches, drains, terminations, faults."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session

from fractal.assignment.service import assign_mandelbox
from fractal.clock import utcnow
from fractal.cloud.base import CloudError, LaunchedHost, LaunchRequest
from fractal.cloud.memory import MemoryCloud
from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.fleet.mandelboxes import move_mandelboxes
from fractal.models import (
    EndReason,
    Event,
    Heartbeat,
    Image,
    Instance,
    InstanceStatus,
    Mandelbox,
    MandelboxStatus,
)
from fractal.scaling.reconcile import LAUNCH_VISIBILITY_GRACE_S, PENDING_PREFIX, reconcile_fleet
from test.factories import Factories

S = InstanceStatus


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"target_free_mandelboxes": 10, "scale_down_delay_s": 300, "boot_timeout_s": 900, "host_timeout_s": 60}


@pytest.fixture
def cloud() -> MemoryCloud:
    return MemoryCloud()


def statuses(db: Session, **where: Any) -> dict[str, InstanceStatus]:
    query = select(Instance.instance_name, Instance.status)
    for key, value in where.items():
        query = query.where(getattr(Instance, key) == value)
    db.expire_all()
    return dict(db.execute(query).all())  # type: ignore[arg-type]


def count_status(db: Session, status: InstanceStatus, **where: Any) -> int:
    return sum(1 for s in statuses(db, **where).values() if s is status)


def run(session_factory: SessionFactory, settings: Settings, cloud: Any, **kw: Any) -> Any:
    report = reconcile_fleet(session_factory, settings=settings, cloud=cloud, **kw)
    assert report.ran
    return report


def test_empty_fleet_launches_the_buffer_once(
    db: Session, session_factory: SessionFactory, settings: Settings, cloud: MemoryCloud, factories: Factories
) -> None:
    factories.image(mandelbox_capacity=4)
    report = run(session_factory, settings, cloud)
    assert report.count("launch") == 3  # ceil(10 / 4)
    rows = db.scalars(select(Instance)).all()
    assert {r.status for r in rows} == {S.PRE_CONNECTION}
    assert {r.cloud_provider_id for r in rows} == {h.cloud_provider_id for h in cloud.hosts.values()}
    assert cloud.running() == {r.instance_name for r in rows}
    # Each host got its own secret and the host API URL; the row keeps only the hash.
    assert len({req.host_secret for req in cloud.launches}) == 3
    assert {req.host_api_url for req in cloud.launches} == {settings.host_api_url}
    kinds = db.scalars(select(Event.kind).where(Event.actor == "scaler")).all()
    assert kinds.count("instance.launched") == 3 and "scaler.decision" in kinds
    # Booting capacity counts: a second pass launches nothing.
    assert run(session_factory, settings, cloud).count("launch") == 0
    assert len(cloud.launches) == 3


def test_hosts_that_never_shake_hands_are_terminated_after_the_boot_timeout(
    db: Session, session_factory: SessionFactory, settings: Settings, cloud: MemoryCloud, factories: Factories
) -> None:
    factories.image(mandelbox_capacity=10)
    run(session_factory, settings, cloud)
    (first,) = statuses(db)
    run(session_factory, settings, cloud, now=utcnow() + timedelta(seconds=899))
    assert statuses(db)[first] is S.PRE_CONNECTION
    report = run(session_factory, settings, cloud, now=utcnow() + timedelta(seconds=901))
    assert statuses(db)[first] is S.TERMINATED
    assert first not in cloud.running()
    assert [a.detail.get("reason") for a in report.actions if a.action == "terminate"] == ["boot_timeout"]
    assert report.count("launch") == 1  # and a replacement is on its way


def test_silent_hosts_become_lost_then_terminated_and_their_mandelboxes_end(
    db: Session, session_factory: SessionFactory, settings: Settings, cloud: MemoryCloud, factories: Factories
) -> None:
    factories.image(mandelbox_capacity=4, target_free=0)
    instance, _ = factories.instance(cloud_provider_id="mem-lost", status=S.ACTIVE)
    cloud.launch(LaunchRequest(instance.instance_name, "us-east-1", "abc123", "ami", "t", 4, "s", "u"))
    cloud_id = next(iter(cloud.hosts))
    db.execute(update(Instance).values(cloud_provider_id=cloud_id))
    db.add(Heartbeat(instance_name=instance.instance_name, last_heartbeat_at=utcnow() - timedelta(seconds=120)))
    db.commit()
    box = assign_mandelbox(db, user_id="u1", regions=["us-east-1"], client_commit_hash="abc123").assignment

    report = run(session_factory, settings, cloud)
    assert [a.action for a in report.actions if a.instance_name == instance.instance_name][:2] == ["lost", "terminate"]
    assert statuses(db)[instance.instance_name] is S.TERMINATED
    assert cloud.running() == set()
    mandelbox = db.get(Mandelbox, box.mandelbox_id)
    assert mandelbox is not None and mandelbox.status is MandelboxStatus.EXITED
    assert mandelbox.end_reason is EndReason.HOST_LOST


def test_draining_instance_is_terminated_only_once_empty(
    db: Session, session_factory: SessionFactory, settings: Settings, cloud: MemoryCloud, factories: Factories
) -> None:
    factories.image(mandelbox_capacity=4, target_free=0)
    instance, _ = factories.instance()
    box = assign_mandelbox(db, user_id="u1", regions=["us-east-1"], client_commit_hash="abc123").assignment
    db.execute(update(Instance).values(status=S.DRAINING))
    db.commit()
    run(session_factory, settings, cloud)
    assert statuses(db)[instance.instance_name] is S.DRAINING
    move_mandelboxes(
        db,
        where=Mandelbox.mandelbox_id == box.mandelbox_id,
        to=MandelboxStatus.EXITED,
        reason=EndReason.HOST_EXITED,
        actor="test",
    )
    db.commit()
    run(session_factory, settings, cloud)
    assert statuses(db)[instance.instance_name] is S.TERMINATED  # no cloud host: describe finds nothing → gone


def test_terminated_instances_end_their_live_mandelboxes(
    db: Session, session_factory: SessionFactory, settings: Settings, cloud: MemoryCloud, factories: Factories
) -> None:
    factories.image(target_free=0)
    instance, _ = factories.instance()
    box = assign_mandelbox(db, user_id="u1", regions=["us-east-1"], client_commit_hash="abc123").assignment
    db.execute(update(Instance).values(status=S.TERMINATING))  # e.g. an operator's decision
    db.commit()
    report = run(session_factory, settings, cloud)
    db.expire_all()
    mandelbox = db.get(Mandelbox, box.mandelbox_id)
    assert mandelbox is not None and mandelbox.end_reason is EndReason.INSTANCE_TERMINATED
    assert db.get(Instance, instance.instance_name).live_mandelboxes == 0  # type: ignore[union-attr]
    assert report.count("mandelbox_ended") == 1


def test_spare_empty_instances_drain_after_the_cool_down(
    db: Session, session_factory: SessionFactory, settings: Settings, cloud: MemoryCloud, factories: Factories
) -> None:
    factories.image(mandelbox_capacity=4, target_free=4)
    for _ in range(3):
        factories.instance(empty_since=utcnow())
    run(session_factory, settings, cloud)
    assert count_status(db, S.ACTIVE) == 3  # still inside the cool-down
    patient = Settings(**{**settings.model_dump(), "host_timeout_s": 3600})  # no heartbeats in this test
    report = run(session_factory, patient, cloud, now=utcnow() + timedelta(seconds=301))
    assert report.count("drain") == 2 and report.count("terminated") == 2
    assert count_status(db, S.ACTIVE) == 1 and count_status(db, S.TERMINATED) == 2


def test_launches_respect_the_region_maximum(
    db: Session, session_factory: SessionFactory, settings: Settings, cloud: MemoryCloud, factories: Factories
) -> None:
    factories.image(mandelbox_capacity=1, target_free=50)
    report = reconcile_fleet(
        session_factory, settings=Settings(**{**settings.model_dump(), "max_instances_per_region": 4}), cloud=cloud
    )
    assert report.count("launch") == 4 and len(cloud.launches) == 4


# --- faults ----------------------------------------------------------------------------------------------
def test_a_refused_launch_leaves_no_live_row_and_is_retried_next_pass(
    db: Session, session_factory: SessionFactory, settings: Settings, cloud: MemoryCloud, factories: Factories
) -> None:
    factories.image(mandelbox_capacity=10)
    cloud.fail_launches = 1
    report = run(session_factory, settings, cloud)
    assert report.errors and report.count("launch_failed") == 1
    assert list(statuses(db).values()) == [S.TERMINATED] and cloud.running() == set()
    assert run(session_factory, settings, cloud).count("launch") == 1
    assert count_status(db, S.PRE_CONNECTION) == 1


class AmbiguousCloud(MemoryCloud):
    """Starts the host but loses the answer (a timeout after EC2 accepted the request)."""

    def launch(self, request: LaunchRequest) -> LaunchedHost:
        super().launch(request)
        raise CloudError("read timeout", code="ReadTimeoutError", maybe_done=True)


def test_a_launch_with_a_lost_answer_is_found_by_name_and_terminated(
    db: Session, session_factory: SessionFactory, settings: Settings, factories: Factories
) -> None:
    factories.image(mandelbox_capacity=10)
    cloud = AmbiguousCloud()
    run(session_factory, settings, cloud)
    (name,) = statuses(db)
    assert statuses(db)[name] is S.TERMINATED  # found by its name tag, terminated, confirmed
    assert cloud.running() == set() and len(cloud.terminations) == 1


class CrashingCloud(MemoryCloud):
    """The process dies after the first launch (BaseException: nothing in the pass catches it)."""

    def launch(self, request: LaunchRequest) -> LaunchedHost:
        if self.launches:
            raise KeyboardInterrupt
        return super().launch(request)


def test_a_crash_mid_pass_is_repaired_by_the_next_pass(
    db: Session, session_factory: SessionFactory, settings: Settings, factories: Factories
) -> None:
    factories.image(mandelbox_capacity=4)
    cloud = CrashingCloud()
    with pytest.raises(KeyboardInterrupt):
        reconcile_fleet(session_factory, settings=settings, cloud=cloud)
    pending = db.scalars(select(Instance.cloud_provider_id)).all()
    assert len(pending) == 3 and all(p and p.startswith(PENDING_PREFIX) for p in pending)

    healthy = MemoryCloud(hosts=cloud.hosts)  # same cloud, process restarted
    report = run(session_factory, settings, healthy)
    assert report.count("launch") == 3  # replacements
    assert healthy.running() == set(statuses(db, status=S.PRE_CONNECTION))  # the orphan host was terminated
    # The two launches that never reached the cloud stay TERMINATING until "not found" is proof enough.
    assert count_status(db, S.TERMINATING) == 2
    later = utcnow() + timedelta(seconds=LAUNCH_VISIBILITY_GRACE_S + 1)
    run(session_factory, settings, healthy, now=later)
    assert count_status(db, S.TERMINATING) == 0 and count_status(db, S.TERMINATED) == 3


def test_cloud_errors_never_mark_a_running_host_terminated(
    db: Session, session_factory: SessionFactory, settings: Settings, cloud: MemoryCloud, factories: Factories
) -> None:
    factories.image(mandelbox_capacity=10, target_free=0)
    host = cloud.launch(LaunchRequest("doomed", "us-east-1", "abc123", "ami", "t", 4, "s", "u"))
    factories.instance(instance_name="doomed", cloud_provider_id=host.cloud_provider_id, status=S.TERMINATING)
    cloud.fail_describes = 1
    assert run(session_factory, settings, cloud).errors
    assert statuses(db)["doomed"] is S.TERMINATING and cloud.running() == {"doomed"}
    cloud.fail_terminates = 1
    assert run(session_factory, settings, cloud).errors
    assert statuses(db)["doomed"] is S.TERMINATING and cloud.running() == {"doomed"}
    assert not run(session_factory, settings, cloud).errors
    assert statuses(db)["doomed"] is S.TERMINATED and cloud.running() == set()


# --- set-based -------------------------------------------------------------------------------------------
@contextmanager
def _statements(engine_or_conn: Any) -> Iterator[list[str]]:
    seen: list[str] = []

    def listener(*args: Any) -> None:
        seen.append(args[2])

    event.listen(engine_or_conn, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        event.remove(engine_or_conn, "before_cursor_execute", listener)


def _seed_shape(factories: Factories, n: int) -> None:
    """n instances per shape: busy, idle-spare, draining-empty, booting-overdue, lost."""
    old = utcnow() - timedelta(hours=2)
    for _ in range(n):
        factories.instance(live_mandelboxes=1, mandelbox_capacity=4)
        factories.instance(empty_since=old)
        factories.instance(status=S.DRAINING)
        factories.instance(status=S.PRE_CONNECTION, created_at=old)
        factories.instance(status=S.LOST, created_at=old)


@pytest.mark.parametrize("n", [2])
def test_statement_count_does_not_grow_with_instances(
    connection: Any,
    session_factory: SessionFactory,
    settings: Settings,
    cloud: MemoryCloud,
    factories: Factories,
    n: int,
) -> None:
    factories.image(mandelbox_capacity=4, target_free=4)
    counts = []
    for size in (n, n * 10):
        _seed_shape(factories, size)
        with _statements(connection) as seen:
            run(session_factory, settings, cloud)
        counts.append(len([s for s in seen if not s.lstrip().upper().startswith(("SAVEPOINT", "RELEASE", "ROLLBACK"))]))
    assert counts[0] == counts[1], counts


# --- leadership ----------------------------------------------------------------------------------------------
class BlockingCloud(MemoryCloud):
    """Holds the first launch until released, so a second pass provably overlaps the first."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def launch(self, request: LaunchRequest) -> LaunchedHost:
        self.entered.set()
        assert self.release.wait(20)
        return super().launch(request)


@pytest.mark.slow
def test_two_concurrent_passes_never_double_launch(committed_factory: SessionFactory, settings: Settings) -> None:
    with committed_factory() as session:
        session.add(
            Image(
                region="us-east-1",
                client_commit_hash="v1",
                ami_id="ami-1",
                active=True,
                instance_type="g4dn.xlarge",
                mandelbox_capacity=4,
            )
        )
        session.commit()
    cloud = BlockingCloud()
    reports: list[Any] = []
    first = threading.Thread(
        target=lambda: reports.append(reconcile_fleet(committed_factory, settings=settings, cloud=cloud))
    )
    first.start()
    assert cloud.entered.wait(20)
    second = reconcile_fleet(committed_factory, settings=settings, cloud=cloud)
    cloud.release.set()
    first.join(30)
    assert not second.ran and second.skipped_reason
    assert reports[0].ran and reports[0].count("launch") == 3
    third = reconcile_fleet(committed_factory, settings=settings, cloud=cloud)
    assert third.ran and third.count("launch") == 0
    with committed_factory() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 3
    assert len(cloud.launches) == 3
