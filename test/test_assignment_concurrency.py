"""Many concurrent clients against real Postgres with real commits: capacity is never exceeded or lost."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from fractal.auth.hosts import hash_host_secret
from fractal.database import SessionFactory
from fractal.fleet.mandelboxes import move_mandelboxes
from fractal.models import EndReason, Event, Image, Instance, InstanceStatus, Mandelbox, MandelboxStatus

pytestmark = pytest.mark.slow
Headers = Callable[..., dict[str, str]]


def seed_fleet(factory: SessionFactory, *, instances: int, capacity: int, region: str = "us-east-1") -> None:
    with factory() as session:
        session.add(
            Image(
                region=region,
                client_commit_hash="abc123",
                ami_id="ami-1",
                active=True,
                instance_type="g4dn.xlarge",
                mandelbox_capacity=capacity,
            )
        )
        for n in range(instances):
            session.add(
                Instance(
                    instance_name=f"{region}-host-{n:03d}",
                    region=region,
                    client_commit_hash="abc123",
                    ami_id="ami-1",
                    instance_type="g4dn.xlarge",
                    ip=f"10.0.0.{n + 1}",
                    mandelbox_capacity=capacity,
                    status=InstanceStatus.ACTIVE,
                    host_secret_hash=hash_host_secret(f"secret-{region}-{n}"),
                )
            )
        session.commit()


def assert_counts_consistent(factory: SessionFactory) -> None:
    with factory() as session:
        live = dict(
            session.execute(
                select(Mandelbox.instance_name, func.count())
                .where(Mandelbox.status != "EXITED")
                .group_by(Mandelbox.instance_name)
            ).all()
        )
        for instance in session.scalars(select(Instance)):
            assert 0 <= instance.live_mandelboxes <= instance.mandelbox_capacity
            assert instance.live_mandelboxes == live.get(instance.instance_name, 0), instance


def run_concurrently(n: int, fn: Callable[[int], Any], workers: int = 50) -> list[Any]:
    barrier = threading.Barrier(min(n, workers))

    def start(i: int) -> Any:
        if i < workers:
            barrier.wait(timeout=30)
        return fn(i)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(start, range(n)))


def test_200_users_race_for_50_slots(
    make_app: Callable[..., Any], committed_factory: SessionFactory, user_headers: Headers
) -> None:
    seed_fleet(committed_factory, instances=10, capacity=5)
    app = make_app("public", factory=committed_factory)
    tokens = [user_headers(f"racer-{i}") for i in range(200)]

    def one(i: int) -> tuple[int, str | None]:
        response = app.test_client().post(
            "/mandelbox/assign",
            json={"regions": ["us-east-1"], "client_commit_hash": "abc123"},
            headers=tokens[i],
        )
        return response.status_code, (response.json or {}).get("error")

    results = Counter(run_concurrently(200, one))
    assert results == {(201, None): 50, (503, "NO_INSTANCE_AVAILABLE"): 150}
    with committed_factory() as session:
        assert session.execute(select(func.count()).select_from(Mandelbox)).scalar() == 50
        assert session.execute(select(func.count(func.distinct(Mandelbox.user_id)))).scalar() == 50
        assert session.execute(select(func.sum(Instance.live_mandelboxes))).scalar() == 50
    assert_counts_consistent(committed_factory)


@pytest.mark.parametrize("limit", [1, 3])
def test_one_user_firing_ten_assigns_gets_exactly_the_limit(
    make_app: Callable[..., Any], committed_factory: SessionFactory, user_headers: Headers, limit: int
) -> None:
    seed_fleet(committed_factory, instances=5, capacity=10)
    app = make_app("public", factory=committed_factory, max_mandelboxes_per_user=limit)
    headers = user_headers("greedy")

    def one(_: int) -> int:
        return (
            app.test_client()
            .post(
                "/mandelbox/assign",
                json={"regions": ["us-east-1"], "client_commit_hash": "abc123"},
                headers=headers,
            )
            .status_code
        )

    results = Counter(run_concurrently(10, one, workers=10))
    assert results == {201: limit, 409: 10 - limit}
    with committed_factory() as session:
        owned = session.execute(
            select(func.count()).select_from(Mandelbox).where(Mandelbox.user_id == "greedy")
        ).scalar()
        assert owned == limit
    assert_counts_consistent(committed_factory)


def test_drain_racing_with_assigns_leaves_nothing_new_on_the_drained_instance(
    make_app: Callable[..., Any], committed_factory: SessionFactory, user_headers: Headers
) -> None:
    # One big instance draws most assigns (fullest-first), so the drain lands mid-stream on a hot row.
    seed_fleet(committed_factory, instances=1, capacity=150)
    with committed_factory() as session:
        session.execute(update(Instance).values(live_mandelboxes=0))
        session.commit()
    app = make_app("public", factory=committed_factory)
    tokens = [user_headers(f"drain-racer-{i}") for i in range(120)]
    drained_at_live: list[int] = []

    def one(i: int) -> int:
        if i == 40:
            # The drain: a plain UPDATE that waits for in-flight assigns holding the row, like the admin drain.
            with committed_factory() as session:
                live = session.execute(
                    text(
                        "UPDATE instances SET status = 'DRAINING', status_changed_at = now() "
                        "WHERE instance_name = 'us-east-1-host-000' RETURNING live_mandelboxes"
                    )
                ).scalar_one()
                session.commit()
                drained_at_live.append(live)
        return (
            app.test_client()
            .post(
                "/mandelbox/assign",
                json={"regions": ["us-east-1"], "client_commit_hash": "abc123"},
                headers=tokens[i],
            )
            .status_code
        )

    statuses = Counter(run_concurrently(120, one, workers=30))
    assert drained_at_live, "the drain ran"
    with committed_factory() as session:
        on_drained = session.execute(
            select(func.count()).select_from(Mandelbox).where(Mandelbox.instance_name == "us-east-1-host-000")
        ).scalar()
    # Everything on the drained instance was committed before the drain returned; nothing landed after.
    assert on_drained == drained_at_live[0]
    assert statuses[201] == on_drained
    assert statuses[503] == 120 - on_drained
    assert_counts_consistent(committed_factory)


def test_the_migrated_first_choice_function_is_the_statement_the_code_builds(engine: Any) -> None:
    """fractal_first_choice is created by a migration (frozen text): a change to the first-choice statement in
    fractal.fleet.mandelboxes must come with a revision that replaces the function."""
    from fractal.fleet.mandelboxes import FIRST_CHOICE_FUNCTION, first_choice_function_body

    with engine.connect() as connection:
        body = connection.execute(
            text("SELECT prosrc FROM pg_proc WHERE proname = :name"), {"name": FIRST_CHOICE_FUNCTION}
        ).scalar_one()
    assert body == first_choice_function_body()


def test_deletes_racing_with_assigns_and_host_exits_on_one_instance(
    make_app: Callable[..., Any], committed_factory: SessionFactory, user_headers: Headers
) -> None:
    # Real commits through the engine: each delete runs its one statement in a transaction of its own.
    seed_fleet(committed_factory, instances=1, capacity=40)
    with committed_factory() as session:
        session.execute(update(Instance).values(live_mandelboxes=0))
        session.commit()
    app = make_app("public", factory=committed_factory)
    body = {"regions": ["us-east-1"], "client_commit_hash": "abc123"}
    owners = [user_headers(f"deleter-{i}") for i in range(20)]
    boxes = []
    for headers in owners:
        answer = app.test_client().post("/mandelbox/assign", json=body, headers=headers)
        assert answer.status_code == 201, answer.json
        boxes.append(answer.json["mandelbox_id"])
    newcomers = [user_headers(f"newcomer-{i}") for i in range(20)]

    def host_exit(i: int) -> None:
        with committed_factory() as session:
            move_mandelboxes(
                session,
                where=Mandelbox.mandelbox_id == uuid.UUID(boxes[i]),
                to=MandelboxStatus.EXITED,
                reason=EndReason.HOST_EXITED,
                actor="host:test",
            )
            session.commit()

    def one(i: int) -> tuple[str, int, str | None]:
        kind, n = divmod(i, 20)
        if kind < 2:  # every owner deletes twice, concurrently
            answer = app.test_client().delete(f"/mandelbox/{boxes[n]}", headers=owners[n])
            return "delete", answer.status_code, (answer.json or {}).get("status")
        if kind == 2:
            answer = app.test_client().post("/mandelbox/assign", json=body, headers=newcomers[n])
            return "assign", answer.status_code, None
        if n % 2 == 0:  # the host reports half of the boxes EXITED meanwhile
            host_exit(n)
            return "exit", 200, None
        answer = app.test_client().delete(f"/mandelbox/{boxes[n]}", headers=owners[(n + 1) % 20])
        return "foreign delete", answer.status_code, None

    results = run_concurrently(80, one, workers=40)
    answers = Counter((kind, status) for kind, status, _ in results)
    assert answers == {("delete", 202): 40, ("assign", 201): 20, ("exit", 200): 10, ("foreign delete", 404): 10}
    assert {shown for kind, _, shown in results if kind == "delete"} <= {"DYING", "EXITED"}
    with committed_factory() as session:
        rows = session.execute(
            select(Mandelbox.mandelbox_id, Mandelbox.status, Mandelbox.end_reason).where(
                Mandelbox.user_id.like("deleter-%")
            )
        ).all()
        assert len(rows) == 20
        for row in rows:
            assert row.status in (MandelboxStatus.DYING, MandelboxStatus.EXITED)
            if row.status is MandelboxStatus.DYING:
                assert row.end_reason is EndReason.USER_DELETED
        # One audit event per box that moved to DYING, none for the repeats or the foreign deletes.
        deleted_events = session.execute(
            select(Event.mandelbox_id, func.count())
            .where(Event.kind == "mandelbox.deleted")
            .group_by(Event.mandelbox_id)
        ).all()
        assert all(count == 1 for _, count in deleted_events)
        dying = sum(1 for row in rows if row.status is MandelboxStatus.DYING)
        assert dying <= len(deleted_events) <= 20
        for event_box, _ in deleted_events:
            detail = session.execute(
                select(Event.detail).where(Event.kind == "mandelbox.deleted", Event.mandelbox_id == event_box)
            ).scalar_one()
            assert detail["to"] == "DYING" and detail["reason"] == "USER_DELETED" and detail["from"] == "ALLOCATED"
    assert_counts_consistent(committed_factory)
