"""Many concurrent clients against real Postgres with real commits: capacity is never exceeded or lost."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from fractal.auth.hosts import hash_host_secret
from fractal.database import SessionFactory
from fractal.models import Image, Instance, InstanceStatus, Mandelbox

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
