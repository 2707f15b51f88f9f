"""Races with real commits: heartbeats never get in assignment's way, and a drain that returns is final."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select, text

from fractal.cloud.host_agent import HostAgent, WsgiTransport
from fractal.database import SessionFactory
from fractal.models import Instance, Mandelbox
from test.test_assignment_concurrency import assert_counts_consistent, run_concurrently, seed_fleet

pytestmark = pytest.mark.slow
Headers = Callable[..., dict[str, str]]
ASSIGN = {"regions": ["us-east-1"], "client_commit_hash": "abc123"}


def agents_for_fleet(factory: SessionFactory, host_app: Any) -> list[HostAgent]:
    with factory() as session:
        names = list(session.scalars(select(Instance.instance_name).order_by(Instance.instance_name)))
    return [
        HostAgent(
            "",
            instance_name=name,
            host_secret=f"secret-us-east-1-{n}",  # seed_fleet's secrets
            ip=f"10.0.0.{n + 1}",
            client_commit_hash="abc123",
            mandelbox_capacity=1,
            http=WsgiTransport(host_app.test_client()),
        )
        for n, name in enumerate(names)
    ]


def assign_all(app: Any, tokens: list[dict[str, str]]) -> tuple[Counter[tuple[int, str | None]], float]:
    def one(i: int) -> tuple[int, str | None]:
        response = app.test_client().post("/mandelbox/assign", json=ASSIGN, headers=tokens[i])
        return response.status_code, (response.json or {}).get("error")

    started = time.monotonic()
    results = Counter(run_concurrently(len(tokens), one, workers=20))
    return results, time.monotonic() - started


def test_assignment_with_200_hosts_heartbeating_at_full_speed(
    make_app: Callable[..., Any], committed_factory: SessionFactory, user_headers: Headers
) -> None:
    seed_fleet(committed_factory, instances=200, capacity=1)
    # 50 users with 5 assigns each (minting a token costs ~50 ms; 250 of them would dominate the test).
    public = make_app("public", factory=committed_factory, max_mandelboxes_per_user=5)
    host = make_app("host", factory=committed_factory)
    agents = agents_for_fleet(committed_factory, host)
    users = [user_headers(f"hb-racer-{i}") for i in range(50)]
    tokens = [users[i % 50] for i in range(250)]
    stop = threading.Event()
    failures: list[BaseException] = []

    def beat(group: list[HostAgent]) -> None:
        # Each thread drives its share of the 200 hosts back to back, with no pause at all.
        while not stop.is_set():
            for agent in group:
                try:
                    agent.heartbeat()
                except BaseException as exc:
                    failures.append(exc)
                    return

    beaters = [threading.Thread(target=beat, args=(agents[i::4],), daemon=True) for i in range(4)]
    for thread in beaters:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while min(agent.heartbeats_sent for agent in agents) == 0 and time.monotonic() < deadline and not failures:
            time.sleep(0.05)  # every host is beating before the assigns start
        before = sum(agent.heartbeats_sent for agent in agents)
        results, elapsed = assign_all(public, tokens)
        heartbeats = sum(agent.heartbeats_sent for agent in agents) - before
    finally:
        stop.set()
        for thread in beaters:
            thread.join(30)
    print(f"\n250 assigns beside {heartbeats} heartbeats of 200 hosts: {elapsed:.2f}s, {250 / elapsed:.0f} assigns/s")

    assert not failures, failures[:3]
    assert results == {(201, None): 200, (503, "NO_INSTANCE_AVAILABLE"): 50}  # every slot filled, none twice
    assert heartbeats >= 20  # the heartbeats really ran beside the assigns
    assert elapsed < 60
    with committed_factory() as session:
        assert session.execute(select(func.count(func.distinct(Mandelbox.instance_name)))).scalar() == 200
    assert_counts_consistent(committed_factory)


def test_heartbeats_pass_a_row_locked_by_an_assign_and_assigns_pass_an_open_heartbeat(
    make_app: Callable[..., Any], committed_factory: SessionFactory, engine: Any
) -> None:
    seed_fleet(committed_factory, instances=1, capacity=2)
    host = make_app("host", factory=committed_factory)
    (agent,) = agents_for_fleet(committed_factory, host)
    agent.heartbeat()

    # An in-flight assign holds the instance row (FOR NO KEY UPDATE): a heartbeat must not wait for it.
    with engine.connect() as holder:
        holder.execute(text("SELECT 1 FROM instances WHERE instance_name = 'us-east-1-host-000' FOR NO KEY UPDATE"))
        done = threading.Event()
        thread = threading.Thread(target=lambda: (agent.heartbeat(), done.set()), daemon=True)
        thread.start()
        assert done.wait(5), "a heartbeat waited for the row lock assignment holds"
        holder.rollback()

    # An uncommitted heartbeat (first insert and later update) must not hide the instance from assignment's
    # SKIP LOCKED pick.
    with engine.connect() as beating:
        beating.execute(
            text(
                "INSERT INTO heartbeats (instance_name, last_heartbeat_at, metrics) "
                "VALUES ('us-east-1-host-000', now(), '{}') "
                "ON CONFLICT (instance_name) DO UPDATE SET last_heartbeat_at = now()"
            )
        )
        with engine.connect() as assigning:
            assigning.execute(text("SET lock_timeout = '2s'"))
            picked = (
                assigning.execute(
                    text(
                        "SELECT instance_name FROM instances WHERE status = 'ACTIVE' "
                        "AND live_mandelboxes < mandelbox_capacity FOR NO KEY UPDATE SKIP LOCKED"
                    )
                )
                .scalars()
                .all()
            )
            assert picked == ["us-east-1-host-000"]
            assigning.rollback()
        beating.rollback()


def test_drain_racing_with_assigns_through_the_admin_api(
    make_app: Callable[..., Any],
    committed_factory: SessionFactory,
    user_headers: Headers,
    admin_headers: dict[str, str],
) -> None:
    # One big instance draws every assign, so the drain lands mid-stream on the hottest row.
    seed_fleet(committed_factory, instances=1, capacity=150)
    public = make_app("public", factory=committed_factory, max_mandelboxes_per_user=5)
    admin = make_app("admin", factory=committed_factory)
    users = [user_headers(f"drain-racer-{i}") for i in range(24)]
    tokens = [users[i % 24] for i in range(120)]
    drained: list[dict[str, Any]] = []

    def one(i: int) -> int:
        if i == 40:
            response = admin.test_client().post("/admin/instances/us-east-1-host-000/drain", headers=admin_headers)
            assert response.status_code == 200
            drained.append(response.json)
            return 0
        response = public.test_client().post("/mandelbox/assign", json=ASSIGN, headers=tokens[i])
        return response.status_code

    results = Counter(run_concurrently(120, one, workers=30))
    assert len(drained) == 1 and drained[0]["status"] == "DRAINING"
    with committed_factory() as session:
        on_instance = session.execute(select(func.count()).select_from(Mandelbox)).scalar()
    # What the drain answered is final: no assignment landed after it returned.
    assert on_instance == drained[0]["live_mandelboxes"] == results[201]
    assert results[201] + results[503] == 119
    assert results[503] > 0
    assert_counts_consistent(committed_factory)
