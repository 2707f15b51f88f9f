"""Demand-aware buffers: the policy maths, the admin API that sets them, and where the target and its reason show
(GET /admin/capacity, /metrics, the scaler's plan). Real Postgres; the events are the ones the services write."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, delete, insert, update
from sqlalchemy.orm import Session

from fractal.assignment.service import assign_mandelbox
from fractal.clock import database_now
from fractal.cloud.memory import MemoryCloud
from fractal.config import Settings
from fractal.errors import NoInstanceAvailableError
from fractal.events import EventKind, record_event
from fractal.models import Base, Event, Instance, InstanceStatus
from fractal.scaling.demand import AskCache, LeadTimeCache, launch_lead_times, recent_arrivals, waiting_users
from fractal.scaling.policy import BufferKind, BufferPolicy, DemandStats, ImageTarget, ScheduledMinimum, decide_target
from fractal.scaling.reconcile import reconcile_fleet
from test.factories import Factories

NOW = datetime(2026, 11, 24, 19, 30, tzinfo=UTC)


def image(policy: BufferPolicy | None, demand: DemandStats | None = None, target_free: int | None = None) -> Any:
    return ImageTarget("us-east-1", "v1", "ami", "g4dn.xlarge", 4, True, target_free, policy, demand)


def test_the_demand_target_is_rate_times_lead_time_times_safety_within_floor_and_ceiling() -> None:
    demand = BufferPolicy(kind=BufferKind.DEMAND, safety_factor=1.5, window_s=600, floor=2, ceiling=30)
    # 60 users in 600 s = 0.1/s; x 120 s lead x 1.5 = 18
    decision = decide_target(image(demand, DemandStats(60, 600, 120.0)), 10, now=NOW)
    assert (decision.target, decision.reason) == (18, "demand")
    assert decision.detail["lead_time_measured"] is True
    assert decide_target(image(demand, DemandStats(1, 600, 120.0)), 10, now=NOW).reason == "floor"
    assert decide_target(image(demand, DemandStats(1000, 600, 120.0)), 10, now=NOW).target == 30
    # No launch measured yet: the policy's default lead time (180 s) stands in.
    unmeasured = decide_target(image(demand, DemandStats(60, 600, None)), 10, now=NOW)
    assert unmeasured.target == 27 and unmeasured.detail["lead_time_measured"] is False


def test_a_scheduled_minimum_raises_the_target_in_its_hours_only() -> None:
    evening = (ScheduledMinimum(hours_utc=(18, 19, 20), min_free=12),)
    static = BufferPolicy(kind=BufferKind.STATIC, schedule=evening)
    assert decide_target(image(static, target_free=3), 10, now=NOW).target == 12
    assert decide_target(image(static, target_free=3), 10, now=NOW).reason == "schedule"
    assert decide_target(image(static, target_free=3), 10, now=NOW.replace(hour=9)).target == 3
    assert decide_target(image(None), 10, now=NOW).reason == "static"


def put_image(admin: Any, headers: dict[str, str], body_extra: dict[str, Any]) -> Any:
    body = {"ami_id": "ami-1", "active": True, "instance_type": "g4dn.xlarge", "mandelbox_capacity": 2, **body_extra}
    return admin.put("/admin/images/us-east-1/v1", json=body, headers=headers)


@pytest.fixture
def admin(make_app: Callable[..., Any]) -> Any:
    app = make_app("admin")
    app.extensions["fractal"].cloud = MemoryCloud()
    return app.test_client()


@pytest.mark.parametrize(
    "policy",
    [
        {"kind": "demand", "floor": 5, "ceiling": 2},
        {"kind": "demand", "safety_factor": 0},
        {"kind": "sometimes"},
        {"kind": "demand", "schedule": [{"hours_utc": [24], "min_free": 1}]},
        {"kind": "demand", "window_s": "900"},
    ],
)
def test_the_admin_api_refuses_an_invalid_buffer_policy(
    admin: Any, admin_headers: dict[str, str], policy: dict[str, Any]
) -> None:
    answer = put_image(admin, admin_headers, {"buffer_policy": policy})
    assert answer.status_code == 400, answer.get_json()
    assert answer.get_json()["error"] == "VALIDATION_ERROR"


def test_capacity_metrics_and_the_plan_show_the_demand_target_and_why(
    admin: Any, admin_headers: dict[str, str], db: Session, factories: Factories, settings: Settings
) -> None:
    policy = {"kind": "demand", "safety_factor": 2, "window_s": 600, "floor": 1, "ceiling": 40}
    answer = put_image(admin, admin_headers, {"buffer_policy": policy})
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["buffer_policy"]["safety_factor"] == 2

    capacity = admin.get("/admin/capacity", headers=admin_headers).get_json()["capacity"]
    assert (capacity[0]["target_free"], capacity[0]["target_reason"]) == (1, "floor")  # nobody asked yet

    # One host took 150 s from launch to ACTIVE; 12 users asked in the window (6 served, 6 refused).
    now = database_now(db)
    host, _ = factories.instance(client_commit_hash="v1", mandelbox_capacity=6, created_at=now - timedelta(seconds=200))
    record_event(db, kind=EventKind.INSTANCE_ACTIVATED, actor="host", instance_name=host.instance_name)
    db.execute(  # activated 150 s after its launch
        update(Event).where(Event.instance_name == host.instance_name).values(created_at=now - timedelta(seconds=50))
    )
    db.commit()
    for n in range(6):
        assign_mandelbox(db, user_id=f"served-{n}", regions=["us-east-1"], client_commit_hash="v1")
    for n in range(6):
        with pytest.raises(NoInstanceAvailableError):
            assign_mandelbox(db, user_id=f"waiting-{n}", regions=["us-east-1"], client_commit_hash="v1")

    row = admin.get("/admin/capacity", headers=admin_headers).get_json()["capacity"][0]
    # 12 users / 600 s x 150 s x 2 = 6
    assert (row["target_free"], row["target_reason"]) == (6, "demand"), row
    assert row["target_detail"]["lead_time_s"] == 150.0 and row["target_detail"]["arrivals"] == 12

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(admin.get("/metrics").get_data(as_text=True))
        for s in family.samples
    }
    labels = (("client_commit_hash", "v1"), ("region", "us-east-1"))
    assert samples[("fractal_target_free_mandelboxes", labels)] == 6
    assert samples[("fractal_target_free_reason", (labels[0], ("reason", "demand"), labels[1]))] == 1

    # The pass plans for 6 free slots plus the 6 users waiting: 0 free now -> ceil(12 / 2) hosts.
    report = reconcile_fleet(db, settings=settings, cloud=MemoryCloud())
    planned = [a for a in report.actions if a.action == "plan_launch"]
    assert len(planned) == 1 and planned[0].detail["target_reason"] == "demand"
    assert planned[0].detail["target_free"] == 6 and planned[0].detail["free"] == 0
    assert planned[0].detail["waiting"] == 6
    assert planned[0].detail["count"] == 6
    assert report.count("launch") == 6


def _demand_history(session: Session, now: datetime) -> None:
    """Events the demand reads count, with the cases a SQL aggregate could get wrong."""

    def host(name: str, region: str, commit: str, launched: datetime) -> None:
        session.execute(
            insert(Instance).values(
                instance_name=name,
                region=region,
                client_commit_hash=commit,
                ami_id="ami",
                instance_type="g4dn.xlarge",
                mandelbox_capacity=4,
                live_mandelboxes=0,
                status=InstanceStatus.ACTIVE,
                host_secret_hash=f"hash-{name}",
                created_at=launched,
            )
        )

    def event(kind: EventKind, actor: str, at: datetime, name: str | None = None, **detail: Any) -> None:
        session.execute(
            insert(Event).values(
                kind=str(kind), actor=actor, instance_name=name, detail=detail, created_at=at, mandelbox_id=None
            )
        )

    refused = EventKind.ASSIGNMENT_REFUSED
    code = "NO_INSTANCE_AVAILABLE"
    host("a-v1", "region-a", "v1", now - timedelta(hours=1))
    host("a-v2", "region-a", "v2", now - timedelta(hours=1))
    for second in (10, 20, 30):  # one user retrying: one arrival
        event(
            refused,
            "user:retry",
            now - timedelta(seconds=second),
            regions=["region-a", "region-b"],
            code=code,
            client_commit_hash="v1",
        )
    # refused, then served: still one arrival of (region-a, v1)
    event(
        refused, "user:served", now - timedelta(seconds=100), regions=["region-a"], code=code, client_commit_hash="v1"
    )
    event(EventKind.MANDELBOX_ASSIGNED, "user:served", now - timedelta(seconds=90), "a-v1")
    event(EventKind.MANDELBOX_ASSIGNED, "user:other", now - timedelta(seconds=50), "a-v1")
    event(EventKind.MANDELBOX_ASSIGNED, "user:v2", now - timedelta(seconds=50), "a-v2")
    event(refused, "user:old", now - timedelta(seconds=700), regions=["region-a"], code=code, client_commit_hash="v1")
    event(refused, "user:future", now + timedelta(seconds=5), regions=["region-a"], code=code, client_commit_hash="v1")
    event(refused, "user:none", now - timedelta(seconds=5), regions=[], code=code, client_commit_hash="v1")
    # Lead times: region-a has 53 activations in the window (the newest 50 count), region-b an even number.
    for n in range(53):
        name = f"lead-a-{n}"
        activated = now - timedelta(minutes=n + 1)
        # the three oldest took 1000 s (ignored: not among the newest 50); the others n seconds + 100.
        took = 1000.0 if n >= 50 else 100.0 + n
        host(name, "region-a", "v1", activated - timedelta(seconds=took))
        event(EventKind.INSTANCE_ACTIVATED, "host", activated, name)
    for n, took in enumerate((60.5, 70.0, 80.0, 300.0)):
        name = f"lead-b-{n}"
        host(name, "region-b", "v1", now - timedelta(minutes=10, seconds=took))
        event(EventKind.INSTANCE_ACTIVATED, "host", now - timedelta(minutes=10), name)
    host("lead-c-old", "region-c", "v1", now - timedelta(hours=7))  # activated before the window: no sample
    event(EventKind.INSTANCE_ACTIVATED, "host", now - timedelta(hours=6, seconds=1), "lead-c-old")
    session.commit()


def _session_on(backend: str, db: Session) -> Session:
    """The Postgres test session, or a session on a fresh in-memory SQLite database with the model's tables."""
    if backend == "postgres":
        return db
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    return Session(engine)


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_the_demand_reads_count_distinct_users_and_take_the_median_of_the_newest_launches(
    backend: str, db: Session
) -> None:
    session = _session_on(backend, db)
    now = NOW
    _demand_history(session, now)
    keys = [("region-a", "v1"), ("region-a", "v2"), ("region-b", "v1"), ("region-c", "v1")]
    arrivals = recent_arrivals(session, now=now, window_s=600, keys=keys)
    # retry, served, other in (region-a, v1); v2 in (region-a, v2); the retrying user's first region only.
    assert arrivals == {("region-a", "v1"): 3, ("region-a", "v2"): 1, ("region-b", "v1"): 0, ("region-c", "v1"): 0}
    lead = launch_lead_times(session, now=now, regions=["region-a", "region-b", "region-c"])
    # region-a: 100..149 s, median (124 + 125) / 2; region-b: (70 + 80) / 2; region-c: nothing in the window.
    assert lead == {"region-a": 124.5, "region-b": 75.0}
    if backend == "sqlite":
        session.close()


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_the_lead_time_cache_gives_what_a_fresh_read_gives_as_hosts_activate_and_leave_the_window(
    backend: str, db: Session
) -> None:
    session = _session_on(backend, db)
    _demand_history(session, NOW)
    cache = LeadTimeCache()
    regions = ["region-a", "region-b", "region-c"]

    def activate(name: str, region: str, at: datetime, took_s: float) -> None:
        session.execute(
            insert(Instance).values(
                instance_name=name,
                region=region,
                client_commit_hash="v1",
                ami_id="ami",
                instance_type="g4dn.xlarge",
                mandelbox_capacity=4,
                status=InstanceStatus.ACTIVE,
                cloud_provider_id=f"i-{name}",
                host_secret_hash=f"hash-{name}",
                created_at=at - timedelta(seconds=took_s),
                status_changed_at=at,
            )
        )
        session.execute(
            insert(Event).values(
                kind=str(EventKind.INSTANCE_ACTIVATED), actor="host", instance_name=name, detail={}, created_at=at
            )
        )
        session.commit()

    def both(now: datetime) -> dict[str, float]:
        cached = launch_lead_times(session, now=now, regions=regions, cache=cache)
        assert cached == launch_lead_times(session, now=now, regions=regions)  # a fresh read
        return cached

    assert both(NOW) == {"region-a": 124.5, "region-b": 75.0}
    assert cache.reads == 1
    activate("late-c", "region-c", NOW + timedelta(seconds=30), 42.0)
    assert both(NOW + timedelta(seconds=60))["region-c"] == 42.0
    # Time passes: region-b's four activations (10 minutes before NOW) leave the window, one by one of region-a's.
    later = NOW + timedelta(hours=6) - timedelta(minutes=10)
    assert "region-b" not in both(later)
    # A newer activation: read as an increment.
    activate("new-b", "region-b", later - timedelta(seconds=5), 77.0)
    assert both(later + timedelta(seconds=1))["region-b"] == 77.0
    # One stamped after the pass's clock (a transaction that began later) and one before it, with a newer id: the
    # first enters the window after the second, with an older id than the cache's newest. The count shows it.
    activate("ahead-b", "region-b", later + timedelta(seconds=30), 100.0)
    activate("behind-b", "region-b", later + timedelta(seconds=5), 99.0)
    assert both(later + timedelta(seconds=10))["region-b"] == 88.0
    assert cache.reads == 1
    assert both(later + timedelta(seconds=31))["region-b"] == 99.0
    assert cache.reads == 2  # the first read and the one the count asked for; the rest were increments
    for step in range(1, 40):
        both(later + timedelta(minutes=step))
    assert cache.reads == 2
    cache.clear()
    assert both(later + timedelta(minutes=41)) and cache.reads == 3
    if backend == "sqlite":
        session.close()


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_the_ask_cache_gives_what_fresh_reads_give_as_asks_arrive_commit_late_and_leave(
    backend: str, db: Session
) -> None:
    """AskCache against the database's own count and read, pass after pass: new asks (some stamped after the
    pass's clock), late commits of lower ids (near the newest: found by re-reading the tail; far below: the whole
    window is read again), a deletion inside the window, and a longer window asked for."""
    session = _session_on(backend, db)
    _demand_history(session, NOW)
    session.commit()
    rng = random.Random(17)
    cache = AskCache()
    cache.TAIL_IDS = 50
    keys = [(region, commit) for region in ("region-a", "region-b", "region-c") for commit in ("v1", "v2")]
    next_id = [10_000]

    def ask(at: datetime, *, event_id: int | None = None) -> None:
        if event_id is None:
            next_id[0] += 10  # gaps, so a "late commit" can take an id below the newest
            event_id = next_id[0]
        actor = f"user:{rng.randrange(40)}"
        if rng.random() < 0.4:
            name = rng.choice(["a-v1", "a-v2", "gone-host"])  # an assignment on a row that is gone counts nowhere
            values: dict[str, Any] = {"kind": str(EventKind.MANDELBOX_ASSIGNED), "instance_name": name, "detail": {}}
        else:
            code = rng.choice(["NO_INSTANCE_AVAILABLE", "COMMIT_HASH_MISMATCH"])
            regions = rng.choice([["region-a"], ["region-b", "region-a"], ["region-c"], []])
            detail = {"code": code, "regions": regions, "client_commit_hash": rng.choice(["v1", "v2"])}
            values = {"kind": str(EventKind.ASSIGNMENT_REFUSED), "instance_name": None, "detail": detail}
        session.execute(insert(Event).values(id=event_id, actor=actor, created_at=at, mandelbox_id=None, **values))

    def both(now: datetime, window_s: float = 600) -> None:
        cached = recent_arrivals(session, now=now, window_s=window_s, keys=keys, cache=cache)
        assert cached == recent_arrivals(session, now=now, window_s=window_s, keys=keys)  # counted in SQL
        for waiting_window_s in (30.0, window_s):
            fresh = waiting_users(session, now=now, window_s=waiting_window_s)
            assert waiting_users(session, now=now, window_s=waiting_window_s, cache=cache) == fresh

    now = NOW
    both(now)
    assert cache.reads == 1
    for _ in range(60):  # passes 15 s apart, a few asks between them, some stamped ahead of the next clock
        for _ in range(rng.randrange(6)):
            ask(now + timedelta(seconds=rng.uniform(0, 20)))
        session.commit()
        now += timedelta(seconds=15)
        both(now)
    # A lower id committed late, just below the newest: the tail's read finds it, no whole-window read.
    reads = cache.reads
    ask(now - timedelta(seconds=5), event_id=next_id[0] - 5)
    session.commit()
    both(now + timedelta(seconds=1))
    assert cache.reads == reads
    # Far below the newest (a long-open transaction): only the whole window's read finds it.
    ask(now - timedelta(seconds=5), event_id=9_000)
    session.commit()
    both(now + timedelta(seconds=2))
    assert cache.reads == reads + 1
    # An ask deleted inside the window (a purge elsewhere): the count shows it too.
    session.execute(delete(Event).where(Event.id == next_id[0]))
    session.commit()
    both(now + timedelta(seconds=3))
    assert cache.reads == reads + 2
    both(now + timedelta(seconds=4), window_s=1200)  # a longer window: read whole once, then increments
    both(now + timedelta(seconds=20), window_s=1200)
    assert cache.reads == reads + 3
    # A window holding more than the cache may hold is counted in the database, pass after pass, the same.
    cache.MAX_HELD = 5
    for step in range(3):
        both(now + timedelta(seconds=30 + step))
    assert cache.reads == reads + 3
    if backend == "sqlite":
        session.close()
