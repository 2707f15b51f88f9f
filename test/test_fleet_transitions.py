"""The transition tables are the law: every allowed move works, every other one is refused, from every entry point
(the movers themselves, a host's report, a user's DELETE, an operator's drain, the sweeps and the scaler pass)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from fractal.clock import database_now
from fractal.cloud.memory import MemoryCloud
from fractal.config import Settings
from fractal.fleet import instances as fleet_instances
from fractal.fleet import mandelboxes as fleet_mandelboxes
from fractal.fleet.instances import move_instances
from fractal.fleet.mandelboxes import HOST_REPORTABLE, move_mandelboxes
from fractal.fleet.sweeps import run_sweeps
from fractal.models import EndReason, Event, Instance, InstanceStatus, Mandelbox, MandelboxStatus
from fractal.scaling.reconcile import reconcile_fleet
from test.factories import Factories

LIVE = (MandelboxStatus.ALLOCATED, MandelboxStatus.CONNECTING, MandelboxStatus.RUNNING, MandelboxStatus.DYING)


def make_box(db: Session, factories: Factories, status: MandelboxStatus, **instance: Any) -> tuple[Mandelbox, str]:
    """A mandelbox in ``status`` on its own instance (live count kept consistent); returns it and the host secret."""
    live = status is not MandelboxStatus.EXITED
    host, secret = factories.instance(live_mandelboxes=1 if live else 0, **instance)
    box = Mandelbox(
        mandelbox_id=uuid.uuid4(),
        instance_name=host.instance_name,
        user_id="owner",
        status=status,
        ended_at=None if live else database_now(db),
        end_reason=None if live else EndReason.HOST_EXITED,
    )
    db.add(box)
    db.commit()
    return box, secret


def status_of(db: Session, model: Any, key: Any) -> Any:
    db.expire_all()
    return db.get(model, key).status


# --- the movers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "to"), list(itertools.product(InstanceStatus, InstanceStatus)))
def test_instance_mover_follows_the_table(
    db: Session, factories: Factories, start: InstanceStatus, to: InstanceStatus
) -> None:
    instance, _ = factories.instance(status=start)
    moved = move_instances(db, where=Instance.instance_name == instance.instance_name, to=to, actor="t", reason="t")
    db.commit()
    allowed = to in fleet_instances.TRANSITIONS[start]
    assert bool(moved) is allowed
    assert status_of(db, Instance, instance.instance_name) is (to if allowed else start)
    events = db.scalars(select(Event).where(Event.instance_name == instance.instance_name)).all()
    assert len(events) == (1 if allowed else 0)


@pytest.mark.parametrize(("start", "to"), list(itertools.product(MandelboxStatus, MandelboxStatus)))
def test_mandelbox_mover_follows_the_table(
    db: Session, factories: Factories, start: MandelboxStatus, to: MandelboxStatus
) -> None:
    box, _ = make_box(db, factories, start)
    moved = move_mandelboxes(
        db, where=Mandelbox.mandelbox_id == box.mandelbox_id, to=to, actor="t", reason=EndReason.HOST_EXITED
    )
    db.commit()
    allowed = to in fleet_mandelboxes.TRANSITIONS[start]
    assert bool(moved) is allowed
    assert status_of(db, Mandelbox, box.mandelbox_id) is (to if allowed else start)
    # Ending a box gives its slot back in the same transaction; nothing else touches the live count.
    live_after = 0 if (allowed and to is MandelboxStatus.EXITED) or start is MandelboxStatus.EXITED else 1
    db.expire_all()
    assert db.get(Instance, box.instance_name).live_mandelboxes == live_after


def test_exits_need_an_end_reason(db: Session) -> None:
    with pytest.raises(ValueError, match="end reason"):
        move_mandelboxes(db, where=Mandelbox.user_id == "x", to=MandelboxStatus.EXITED, actor="t")


# A condition with bind parameters, as the hot callers pass it: module-level, its values in ``params``.
BY_IDS = Mandelbox.mandelbox_id.in_(bindparam("ids", expanding=True))


def test_a_reusable_condition_moves_only_what_its_parameters_name(db: Session, factories: Factories) -> None:
    first, _ = make_box(db, factories, MandelboxStatus.RUNNING)
    second, _ = make_box(db, factories, MandelboxStatus.ALLOCATED)
    bystander, _ = make_box(db, factories, MandelboxStatus.RUNNING)
    # The second and third calls run the statements the first built; each moves only the rows it names, and the
    # repeat moves nothing.
    for box, expected in ((first, [first.mandelbox_id]), (second, [second.mandelbox_id]), (first, [])):
        moved = move_mandelboxes(
            db,
            where=BY_IDS,
            params={"ids": [box.mandelbox_id]},
            to=MandelboxStatus.EXITED,
            reason=EndReason.HOST_EXITED,
            actor="t",
        )
        db.commit()
        assert [m.mandelbox_id for m in moved] == expected
    assert status_of(db, Mandelbox, first.mandelbox_id) is MandelboxStatus.EXITED
    assert status_of(db, Mandelbox, second.mandelbox_id) is MandelboxStatus.EXITED
    assert status_of(db, Mandelbox, bystander.mandelbox_id) is MandelboxStatus.RUNNING
    db.expire_all()
    assert [db.get(Instance, box.instance_name).live_mandelboxes for box in (first, second, bystander)] == [0, 0, 1]
    ended = [first.mandelbox_id, second.mandelbox_id]
    events = db.scalars(select(Event).where(Event.mandelbox_id.in_(ended))).all()
    assert sorted(str(e.mandelbox_id) for e in events) == sorted(str(i) for i in ended)  # one each, none for the repeat


def test_a_reusable_condition_may_not_use_the_movers_own_parameter_names(db: Session) -> None:
    with pytest.raises(ValueError, match="mover's own names"):
        move_mandelboxes(db, where=BY_IDS, params={"ids": [], "move_ids": []}, to=MandelboxStatus.DYING, actor="t")


# --- the entry points ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "to"),
    list(
        itertools.product(
            MandelboxStatus,
            [MandelboxStatus.CONNECTING, MandelboxStatus.RUNNING, MandelboxStatus.DYING, MandelboxStatus.EXITED],
        )
    ),
)
def test_host_reports_follow_the_table(
    db: Session, factories: Factories, host_client: Any, start: MandelboxStatus, to: MandelboxStatus
) -> None:
    box, secret = make_box(db, factories, start)
    answer = host_client.put(
        f"/host/mandelboxes/{box.mandelbox_id}", json={"status": str(to)}, headers={"Authorization": f"Bearer {secret}"}
    )
    if to is start or to in HOST_REPORTABLE[start]:
        assert answer.status_code == 200, answer.json
        assert status_of(db, Mandelbox, box.mandelbox_id) is to
    else:
        assert answer.status_code == 409 and answer.json["error"] == "INVALID_TRANSITION", answer.json
        assert status_of(db, Mandelbox, box.mandelbox_id) is start


@pytest.mark.parametrize("start", list(MandelboxStatus))
def test_a_users_delete_follows_the_table(
    db: Session,
    factories: Factories,
    public_client: Any,
    user_headers: Callable[..., dict[str, str]],
    start: MandelboxStatus,
) -> None:
    box, _ = make_box(db, factories, start)
    answer = public_client.delete(f"/mandelbox/{box.mandelbox_id}", headers=user_headers("owner"))
    assert answer.status_code == 202
    expected = MandelboxStatus.DYING if MandelboxStatus.DYING in fleet_mandelboxes.TRANSITIONS[start] else start
    assert status_of(db, Mandelbox, box.mandelbox_id) is expected


@pytest.mark.parametrize("start", list(InstanceStatus))
def test_an_operators_drain_follows_the_table(
    db: Session, factories: Factories, admin_client: Any, admin_headers: dict[str, str], start: InstanceStatus
) -> None:
    instance, _ = factories.instance(status=start)
    answer = admin_client.post(f"/admin/instances/{instance.instance_name}/drain", headers=admin_headers)
    if start is InstanceStatus.DRAINING or InstanceStatus.DRAINING in fleet_instances.TRANSITIONS[start]:
        assert answer.status_code == 200 and answer.json["status"] == "DRAINING", answer.json
    else:
        assert answer.status_code == 409 and answer.json["error"] == "INVALID_TRANSITION", answer.json
        assert status_of(db, Instance, instance.instance_name) is start


def test_sweeps_and_the_scaler_only_make_moves_the_tables_allow(
    db: Session, factories: Factories, settings: Settings
) -> None:
    # Every instance status, each with every mandelbox status, all long silent and long unclaimed.
    long_ago = database_now(db) - timedelta(hours=2)
    before: dict[Any, Any] = {}
    for instance_status in InstanceStatus:
        host, _ = factories.instance(
            status=instance_status,
            live_mandelboxes=len(LIVE),
            mandelbox_capacity=len(LIVE) + 1,
            created_at=long_ago,
            status_changed_at=long_ago,
            cloud_provider_id=None,
        )
        before[(Instance, host.instance_name)] = instance_status
        for box_status in MandelboxStatus:
            box = Mandelbox(
                mandelbox_id=uuid.uuid4(),
                instance_name=host.instance_name,
                user_id=f"u-{uuid.uuid4().hex[:6]}",
                status=box_status,
                created_at=long_ago,
                status_changed_at=long_ago,
                ended_at=long_ago if box_status is MandelboxStatus.EXITED else None,
                end_reason=EndReason.HOST_EXITED if box_status is MandelboxStatus.EXITED else None,
            )
            db.add(box)
            before[(Mandelbox, box.mandelbox_id)] = box_status
    db.commit()
    quick = Settings(**{**settings.model_dump(), "host_timeout_s": 1, "connect_timeout_s": 1, "boot_timeout_s": 1})
    run_sweeps(db, settings=quick)
    for _ in range(3):
        reconcile_fleet(db, settings=quick, cloud=MemoryCloud())
    db.expire_all()
    changed = 0
    ended: list[str] = []
    for (model, key), start in before.items():
        now = db.get(model, key).status
        if now is start:
            continue
        changed += 1
        table = fleet_instances.TRANSITIONS if model is Instance else fleet_mandelboxes.TRANSITIONS
        # A row may have taken several steps (LOST → TERMINATING → TERMINATED): each step must be allowed.
        assert _reachable(table, start, now), (model.__name__, start, now)
        if model is Instance and now in (InstanceStatus.LOST, InstanceStatus.TERMINATED):
            ended.append(key)
    assert changed > 10 and ended
    # What the pass itself ended holds no live mandelbox any more.
    live_on_ended = db.scalars(
        select(Mandelbox.mandelbox_id).where(
            Mandelbox.instance_name.in_(ended), Mandelbox.status != MandelboxStatus.EXITED
        )
    ).all()
    assert live_on_ended == []


def _reachable(table: Any, start: Any, end: Any) -> bool:
    seen, frontier = {start}, [start]
    while frontier:
        for following in table[frontier.pop()]:
            if following == end:
                return True
            if following not in seen:
                seen.add(following)
                frontier.append(following)
    return False


def test_on_sqlite_an_end_reads_its_rows_once_and_gives_each_slot_back_once(settings: Settings) -> None:
    """SQLite has no row locks: an EXITED move there reads its rows without first reading their instances (the lock
    of the fleet's lock order elsewhere), and still gives every slot back exactly once."""
    from sqlalchemy import event

    from fractal.database import create_db_engine, in_values
    from fractal.models import Base

    engine = create_db_engine(Settings(**{**settings.model_dump(), "database_url": "sqlite:///:memory:"}))
    Base.metadata.create_all(engine)
    by_ids = in_values(Mandelbox.__table__.c.mandelbox_id, "ids")  # type: ignore[attr-defined]
    with Session(engine) as session:
        for name in ("host-a", "host-b"):
            session.add(
                Instance(
                    instance_name=name,
                    region="us-east-1",
                    client_commit_hash="v1",
                    ami_id="ami-1",
                    instance_type="g4dn.xlarge",
                    mandelbox_capacity=4,
                    live_mandelboxes=2,
                    status=InstanceStatus.ACTIVE,
                    host_secret_hash=f"secret-{name}",
                )
            )
        session.flush()
        boxes = [
            Mandelbox(mandelbox_id=uuid.uuid4(), instance_name=name, user_id=f"u{i}", status=MandelboxStatus.RUNNING)
            for i, name in enumerate(["host-a", "host-a", "host-b", "host-b"])
        ]
        session.add_all(boxes)
        session.commit()
        ended = [boxes[0].mandelbox_id, boxes[1].mandelbox_id, boxes[2].mandelbox_id]
        seen: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda *args: seen.append(args[2]))

        def end() -> list[Any]:
            ended_now = move_mandelboxes(
                session,
                where=by_ids,
                params={"ids": ended},
                to=MandelboxStatus.EXITED,
                reason=EndReason.HOST_EXITED,
                actor="test",
            )
            session.commit()
            return ended_now

        moved = end()
        assert sorted(m.mandelbox_id for m in moved) == sorted(ended)
        assert not any(s.lstrip().startswith("SELECT instances.instance_name") for s in seen)
        live = dict(session.execute(select(Instance.instance_name, Instance.live_mandelboxes)).all())
        assert live == {"host-a": 0, "host-b": 1}
        assert end() == []
        assert dict(session.execute(select(Instance.instance_name, Instance.live_mandelboxes)).all()) == live
        events = session.scalars(select(Event).where(Event.actor == "test")).all()
        assert len(events) == 3 and {e.detail["to"] for e in events} == {"EXITED"}
    engine.dispose()
