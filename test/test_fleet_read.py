"""The scaler's fleet read on each backend: the busy ACTIVE hosts of active images come summed per (region,
version), every other host one by one, and the plan is the one the whole fleet read row by row gives; the
instance mover's status re-check leaves SQLite's planner to the caller's own condition; the sweeps' stuck-mandelbox
read can seek its partial index."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, select, text
from sqlalchemy.orm import Session

from fractal.database import in_values, sqlite_unindexed
from fractal.fleet.instances import _move_statement, move_instances
from fractal.models import Instance, InstanceStatus
from fractal.scaling.policy import BusyHosts, InstanceSnapshot, plan_fleet
from fractal.scaling.steps import NOT_TERMINATED, observe
from test.factories import Factories

S = InstanceStatus
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
_instances = cast(Table, Instance.__table__)


def _fleet(session: Session) -> dict[str, str]:
    """Hosts of an active image (us-east-1/v1), an inactive one (us-east-1/v0) and an active one elsewhere."""
    factories = Factories(session)
    factories.image(region="us-east-1", client_commit_hash="v1", active=True)
    factories.image(region="us-east-1", client_commit_hash="v0", active=False)
    factories.image(region="eu-west-1", client_commit_hash="v1", active=True)
    layout: dict[str, dict[str, Any]] = {
        "busy_a": {"live_mandelboxes": 1},  # 3 free
        "busy_b": {"live_mandelboxes": 4},  # full
        "busy_small": {"mandelbox_capacity": 2, "live_mandelboxes": 2},  # full
        "empty": {"live_mandelboxes": 0},
        "booting": {"status": S.PRE_CONNECTION},
        "draining_busy": {"status": S.DRAINING, "live_mandelboxes": 2},
        "old_busy": {"client_commit_hash": "v0", "live_mandelboxes": 1},
        "gone": {"status": S.TERMINATED},
        "eu_busy": {"region": "eu-west-1", "live_mandelboxes": 2},
    }
    names = {}
    for label, overrides in layout.items():
        row, _ = factories.instance(
            **{"region": "us-east-1", "client_commit_hash": "v1", "empty_since": NOW - timedelta(hours=1), **overrides}
        )
        names[label] = row.instance_name
    return names


def test_busy_hosts_of_active_images_come_summed_and_the_plan_is_the_row_by_row_one(
    session_on_each_backend: Session,
) -> None:
    session = session_on_each_backend
    names = _fleet(session)
    snapshot = observe(session)

    assert sorted(i.instance_name for i in snapshot.instances) == sorted(
        names[k] for k in ("empty", "booting", "draining_busy", "old_busy")
    )
    assert sorted(snapshot.busy) == [
        BusyHosts("eu-west-1", "v1", hosts=1, free=2),
        BusyHosts("us-east-1", "v1", hosts=3, free=3),
    ]
    # The same fleet row by row, as the read gave it before busy hosts were summed.
    every_row = [
        InstanceSnapshot(name, region, commit, status, capacity, live, None)
        for name, region, commit, status, capacity, live in session.execute(
            select(
                Instance.instance_name,
                Instance.region,
                Instance.client_commit_hash,
                Instance.status,
                Instance.mandelbox_capacity,
                Instance.live_mandelboxes,
            ).where(Instance.status.in_(NOT_TERMINATED))
        )
    ]
    empty = next(i for i in snapshot.instances if i.instance_name == names["empty"])
    assert empty.idle_since is not None
    every_row = [empty if i.instance_name == empty.instance_name else i for i in every_row]
    options: dict[str, Any] = {
        "now": NOW,
        "default_target_free": 6,
        "max_instances_per_region": 20,
        "scale_down_delay_s": 60,
    }
    summed = plan_fleet(snapshot.images, snapshot.instances, busy=snapshot.busy, **options)
    assert summed == plan_fleet(snapshot.images, every_row, **options)
    # What the plan says follows from the fleet: us-east-1/v1 has 3 + 4 (booting) + 4 (empty) = 11 free, so the
    # empty host is spare; the inactive image's busy host drains; eu-west-1 has 2 free and launches ceil(4 / 4).
    assert {(d.instance_name, str(d.reason)) for d in summed.drains} == {
        (names["empty"], "spare"),
        (names["old_busy"], "inactive_image"),
    }
    assert [(p.region, p.count, p.free) for p in summed.launches] == [("eu-west-1", 1, 2)]


def test_a_move_by_name_finds_the_rows_by_name_on_sqlite(session_on_each_backend: Session) -> None:
    """The mover re-checks the allowed statuses; SQLite (no statistics) would serve that re-check from the status
    index and walk every ACTIVE host for a move of one; ``sqlite_unindexed`` leaves it the names' primary key."""
    session = session_on_each_backend
    names = _fleet(session)
    named = in_values(_instances.c.instance_name, "p_names")
    statement = _move_statement(named, None, S.DRAINING, frozenset({S.ACTIVE, S.PRE_CONNECTION}), True)
    dialect = session.get_bind().dialect
    compiled = statement.compile(dialect=dialect)
    if dialect.name == "sqlite":
        assert "+instances.status = " in str(compiled)
        bound = compiled.construct_params({"p_names": None, "move_now": None})
        plan = (
            session.connection()
            .exec_driver_sql(
                "EXPLAIN QUERY PLAN " + str(compiled),
                tuple(
                    "x" if bound[name] is None else str(bound[name]) for name in cast(list[str], compiled.positiontup)
                ),
            )
            .all()
        )
        details = " ".join(str(row[-1]) for row in plan)
        assert "ix_instances_status" not in details and "sqlite_autoindex_instances_1" in details, details
    else:
        assert "+" not in str(compiled).split("WHERE", 1)[1]
    moved = move_instances(
        session,
        where=named,
        to=S.DRAINING,
        actor="test",
        reason="test",
        now=NOW,
        params={"p_names": [names["busy_a"], names["draining_busy"], names["gone"]]},
    )
    assert [m.instance_name for m in moved] == [names["busy_a"]]  # the others may not move to DRAINING
    assert session.execute(text("SELECT count(*) FROM instances WHERE status = 'DRAINING'")).scalar_one() == 2


def test_sqlite_unindexed_is_the_plain_column_on_postgres_and_unary_plus_on_sqlite(
    session_on_each_backend: Session,
) -> None:
    session = session_on_each_backend
    Factories(session).instance(status=S.LOST)
    query = select(_instances.c.instance_name).where(sqlite_unindexed(_instances.c.status) == S.LOST)
    rendered = str(query.compile(dialect=session.get_bind().dialect))
    plus = "+instances.status" in rendered
    assert plus is (session.get_bind().dialect.name == "sqlite")
    assert len(session.execute(query).all()) == 1


def test_the_stuck_mandelbox_read_can_seek_the_transient_index(session_on_each_backend: Session) -> None:
    """The sweeps' "is any mandelbox stuck" read states the transient index's condition, so either backend can
    find the waiting boxes by age (Postgres: with sequential scans off, to see that the index qualifies at all)."""
    from fractal.fleet.sweeps import _ANY_STUCK

    session = session_on_each_backend
    dialect = session.get_bind().dialect
    if dialect.name == "sqlite":
        compiled = _ANY_STUCK.statement.compile(dialect=dialect)
        bound = compiled.construct_params({"cutoff": "2026-12-04 12:00:00.000000"})
        plan = (
            session.connection()
            .exec_driver_sql(
                "EXPLAIN QUERY PLAN " + str(compiled),
                tuple(bound[name] for name in cast(list[str], compiled.positiontup)),
            )
            .all()
        )
    else:
        session.execute(text("SET LOCAL enable_seqscan = off"))
        literal = _ANY_STUCK.statement.params(cutoff=NOW).compile(
            dialect=dialect, compile_kwargs={"literal_binds": True}
        )
        plan = session.execute(text(f"EXPLAIN {literal}")).all()
    assert "ix_mandelboxes_transient" in " ".join(str(row[-1]) for row in plan), plan


def test_the_images_read_gives_each_image_its_buffer_policy(session_on_each_backend: Session) -> None:
    """The images read takes a policy as its stored text and parses each distinct text once: on both backends a
    demand policy comes back whole, and an image without one (SQL NULL or JSON null) is static."""
    from fractal.scaling.policy import BufferKind, BufferPolicy, ScheduledMinimum

    session = session_on_each_backend
    factories = Factories(session)
    stored = {"kind": "demand", "floor": 2, "safety_factor": 2.5, "schedule": [{"hours_utc": [8, 9], "min_free": 6}]}
    factories.image(region="us-east-1", client_commit_hash="demand", buffer_policy=stored)
    factories.image(region="us-east-1", client_commit_hash="static", buffer_policy=None)
    session.execute(text("UPDATE images SET buffer_policy = NULL WHERE client_commit_hash = 'static'"))
    factories.image(region="eu-west-1", client_commit_hash="json-null", buffer_policy=None)
    policies = {image.client_commit_hash: image.buffer_policy for image in observe(session).images}
    assert policies == {
        "demand": BufferPolicy(
            kind=BufferKind.DEMAND, floor=2, safety_factor=2.5, schedule=(ScheduledMinimum((8, 9), 6),)
        ),
        "static": None,
        "json-null": None,
    }
