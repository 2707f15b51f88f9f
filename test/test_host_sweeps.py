"""Sweeps with short timeouts: silent hosts become LOST, unclaimed and unconfirmed mandelboxes end, slots return."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from fractal.clock import utcnow
from fractal.config import Settings
from fractal.events import EventKind
from fractal.fleet.sweeps import mark_silent_hosts_lost, release_unclaimed_mandelboxes, run_sweeps
from fractal.models import EndReason, Event, Heartbeat, Instance, InstanceStatus, Mandelbox, MandelboxStatus
from test.factories import Factories


def add_box(db: Session, instance: Instance, status: MandelboxStatus, *, age_s: float = 0, **kw: Any) -> Mandelbox:
    at = utcnow() - timedelta(seconds=age_s)
    box = Mandelbox(
        mandelbox_id=uuid.uuid4(),
        instance_name=instance.instance_name,
        user_id=kw.pop("user_id", f"user-{uuid.uuid4().hex[:6]}"),
        status=status,
        created_at=at,
        status_changed_at=at,
        **kw,
    )
    db.add(box)
    instance.live_mandelboxes += 1
    instance.empty_since = None
    db.commit()
    return box


def beat(db: Session, instance: Instance, *, age_s: float) -> None:
    db.merge(Heartbeat(instance_name=instance.instance_name, last_heartbeat_at=utcnow() - timedelta(seconds=age_s)))
    db.commit()


@contextmanager
def count_statements(db: Session) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    bind = db.get_bind()
    event.listen(bind, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(bind, "before_cursor_execute", record)


def test_silent_hosts_become_lost_and_their_mandelboxes_exit(db: Session, factories: Factories) -> None:
    old = utcnow() - timedelta(seconds=120)
    silent, _ = factories.instance(status=InstanceStatus.ACTIVE, status_changed_at=old)
    draining, _ = factories.instance(status=InstanceStatus.DRAINING, status_changed_at=old)
    never_beat, _ = factories.instance(status=InstanceStatus.ACTIVE, status_changed_at=old)
    alive, _ = factories.instance(status=InstanceStatus.ACTIVE, status_changed_at=old)
    booting, _ = factories.instance(status=InstanceStatus.PRE_CONNECTION, status_changed_at=old)
    beat(db, silent, age_s=61)
    beat(db, draining, age_s=300)
    beat(db, alive, age_s=5)
    boxes = [add_box(db, silent, MandelboxStatus.RUNNING), add_box(db, silent, MandelboxStatus.ALLOCATED)]
    boxes.append(add_box(db, draining, MandelboxStatus.DYING, end_reason=EndReason.USER_DELETED))
    kept = add_box(db, alive, MandelboxStatus.RUNNING)

    lost = mark_silent_hosts_lost(db, now=utcnow(), host_timeout_s=60)
    db.commit()

    assert lost == sorted([silent.instance_name, draining.instance_name, never_beat.instance_name])
    db.expire_all()
    assert {i.instance_name: i.status for i in db.scalars(select(Instance))} == {
        silent.instance_name: InstanceStatus.LOST,
        draining.instance_name: InstanceStatus.LOST,
        never_beat.instance_name: InstanceStatus.LOST,
        alive.instance_name: InstanceStatus.ACTIVE,
        booting.instance_name: InstanceStatus.PRE_CONNECTION,
    }
    assert db.get(Instance, silent.instance_name).live_mandelboxes == 0  # type: ignore[union-attr]
    assert db.get(Instance, draining.instance_name).live_mandelboxes == 0  # type: ignore[union-attr]
    assert db.get(Instance, alive.instance_name).live_mandelboxes == 1  # type: ignore[union-attr]
    reasons = {b.mandelbox_id: (b.status, b.end_reason) for b in db.scalars(select(Mandelbox))}
    assert reasons[boxes[0].mandelbox_id] == (MandelboxStatus.EXITED, EndReason.HOST_LOST)
    assert reasons[boxes[1].mandelbox_id] == (MandelboxStatus.EXITED, EndReason.HOST_LOST)
    assert reasons[boxes[2].mandelbox_id] == (MandelboxStatus.EXITED, EndReason.USER_DELETED)
    assert reasons[kept.mandelbox_id] == (MandelboxStatus.RUNNING, None)
    lost_events = db.scalars(select(Event).where(Event.kind == str(EventKind.INSTANCE_LOST))).all()
    assert {e.instance_name for e in lost_events} == set(lost)
    assert {e.detail["from"] for e in lost_events} == {"ACTIVE", "DRAINING"}
    assert all(e.actor == "system:sweeps" for e in lost_events)

    # Running it again finds nothing new.
    assert mark_silent_hosts_lost(db, now=utcnow(), host_timeout_s=60) == []


def test_unclaimed_mandelboxes_are_released_and_their_slots_return(db: Session, factories: Factories) -> None:
    instance, _ = factories.instance(mandelbox_capacity=4)
    stale = add_box(db, instance, MandelboxStatus.ALLOCATED, age_s=91)
    fresh = add_box(db, instance, MandelboxStatus.ALLOCATED, age_s=10)
    claimed = add_box(db, instance, MandelboxStatus.CONNECTING, age_s=500)
    deleted = add_box(db, instance, MandelboxStatus.DYING, age_s=91, end_reason=EndReason.USER_DELETED)

    released = release_unclaimed_mandelboxes(db, now=utcnow(), connect_timeout_s=90)
    db.commit()

    assert sorted(released) == sorted([stale.mandelbox_id, deleted.mandelbox_id])
    db.expire_all()
    by_id = {b.mandelbox_id: b for b in db.scalars(select(Mandelbox))}
    assert (by_id[stale.mandelbox_id].status, by_id[stale.mandelbox_id].end_reason) == (
        MandelboxStatus.EXITED,
        EndReason.CLAIM_TIMEOUT,
    )
    assert (by_id[deleted.mandelbox_id].status, by_id[deleted.mandelbox_id].end_reason) == (
        MandelboxStatus.EXITED,
        EndReason.USER_DELETED,
    )
    assert by_id[fresh.mandelbox_id].status is MandelboxStatus.ALLOCATED
    assert by_id[claimed.mandelbox_id].status is MandelboxStatus.CONNECTING
    assert db.get(Instance, instance.instance_name).live_mandelboxes == 2  # type: ignore[union-attr]
    released_events = db.scalars(select(Event).where(Event.kind == str(EventKind.MANDELBOX_RELEASED))).all()
    assert {e.mandelbox_id for e in released_events} == set(released)
    assert release_unclaimed_mandelboxes(db, now=utcnow(), connect_timeout_s=90) == []


def test_sweeps_use_a_fixed_number_of_statements(db: Session, factories: Factories) -> None:
    def run(hosts: int, boxes_per_host: int) -> tuple[int, int]:
        old = utcnow() - timedelta(seconds=600)
        for _ in range(hosts):
            instance, _ = factories.instance(status_changed_at=old, mandelbox_capacity=8)
            for _ in range(boxes_per_host):
                add_box(db, instance, MandelboxStatus.RUNNING)
            other, _ = factories.instance(mandelbox_capacity=8)
            beat(db, other, age_s=1)
            for _ in range(boxes_per_host):
                add_box(db, other, MandelboxStatus.ALLOCATED, age_s=600)
        now = utcnow()
        with count_statements(db) as statements:
            assert len(mark_silent_hosts_lost(db, now=now, host_timeout_s=60)) == hosts
        lost_statements = len(statements)
        with count_statements(db) as statements:
            assert len(release_unclaimed_mandelboxes(db, now=now, connect_timeout_s=60)) == hosts * boxes_per_host
        db.commit()
        return lost_statements, len(statements)

    small = run(1, 1)
    large = run(6, 3)
    assert small == large


def test_run_sweeps_commits_both_sweeps(db: Session, factories: Factories, settings: Settings) -> None:
    old = utcnow() - timedelta(seconds=30)
    silent, _ = factories.instance(status_changed_at=old)
    alive, _ = factories.instance()
    beat(db, alive, age_s=0)
    box = add_box(db, alive, MandelboxStatus.ALLOCATED, age_s=30)
    quick = Settings(**{**settings.model_dump(), "host_timeout_s": 5, "connect_timeout_s": 5})

    result = run_sweeps(db, settings=quick)

    assert result.lost_instances == [silent.instance_name]
    assert result.released_mandelboxes == [box.mandelbox_id]
    assert not result.skipped
    assert db.execute(select(func.count()).select_from(Mandelbox).where(Mandelbox.status != "EXITED")).scalar() == 0
