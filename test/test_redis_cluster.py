"""REDIS_URL naming a real three-master Redis Cluster (redis+cluster://): rate limits shared and enforced, cache
invalidation seen by another replica, scaler nudges crossing processes, keys spread over the masters (with the
cache's multi-key reads kept in one slot), and one master stopped: assignment goes on as with Redis down."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from apiflask import APIFlask
from sqlalchemy import func, select

from fractal.auth.dev_keys import DevKeyPair
from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.images import IMAGES_CACHE_NAMESPACE
from fractal.models import Instance, InstanceStatus, Mandelbox
from fractal.nudge import MAX_BLOCK_S, RedisNudge, build_nudge
from fractal.redis_client import LazyRedisCluster, hash_tag
from test.factories import Factories
from test.redis_support import (
    ThrowawayCluster,
    app_replica,
    call,
    replica_env,
    seed_shared_fleet,
    throwaway_redis_cluster,
    unique_prefix,
)
from test.servers import SmtpServer

pytestmark = pytest.mark.slow
ASSIGN_LIMIT = 3
ASSIGN_BODY = {"regions": ["us-east-1"], "client_commit_hash": "abc123"}
# With a master stopped every answer comes within this: a failed Redis call costs one short timeout, then the
# cache and the limits stop asking for a while.
OUTAGE_ANSWER_BOUND_S = 3.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThrowawayCluster]:
    with throwaway_redis_cluster() as started:
        yield started


@pytest.fixture(scope="module")
def replicas(
    cluster: ThrowawayCluster, database_url: str, keypair: DevKeyPair, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, str]]:
    """Replicas A and B (public + admin APIs, each its own process) on the cluster; yields (a, b, prefix)."""
    prefix = unique_prefix()
    env = replica_env(
        database_url=database_url,
        redis_url=cluster.url,
        prefix=prefix,
        public_pem=keypair.public_pem,
        assign_limit=ASSIGN_LIMIT,
    )
    logs: Path = tmp_path_factory.mktemp("cluster-replicas")
    with app_replica(env, log_path=logs / "a.log") as a, app_replica(env, log_path=logs / "b.log") as b:
        yield a, b, prefix


@pytest.fixture
def fleet(committed_factory: SessionFactory, replicas: tuple[str, str, str], cluster: ThrowawayCluster) -> None:
    seed_shared_fleet(committed_factory, redis_url=cluster.url, prefix=replicas[2])


def keys_by_node(cluster: ThrowawayCluster, prefix: str) -> dict[int, set[str]]:
    """Which master holds which of this prefix's keys (each node holds only its own slots)."""
    found: dict[int, set[str]] = {}
    for port in cluster.ports:
        node = cluster.node(port)
        try:
            found[port] = {key.decode() for key in node.scan_iter(match=f"{prefix}*", count=500)}
        finally:
            node.close()
    return found


@pytest.mark.usefixtures("fleet")
def test_assign_limit_is_shared_and_enforced_across_replicas(
    replicas: tuple[str, str, str], committed_factory: SessionFactory, make_token: Callable[..., str]
) -> None:
    a, b, _ = replicas
    token = make_token("limited-user")
    statuses = [call(base, "POST", "/mandelbox/assign", token=token, body=ASSIGN_BODY)[0] for base in (a, b, a)]
    assert statuses == [201, 201, 201]
    status, headers, body = call(b, "POST", "/mandelbox/assign", token=token, body=ASSIGN_BODY)
    assert (status, body["error"]) == (429, "RATE_LIMITED")
    assert 1 <= int(headers["Retry-After"]) <= 61
    assert call(a, "POST", "/mandelbox/assign", token=make_token("other-user"), body=ASSIGN_BODY)[0] == 201
    with committed_factory() as session:
        assert session.scalar(select(func.count()).select_from(Mandelbox)) == 4


@pytest.mark.usefixtures("fleet")
def test_image_change_on_one_replica_is_seen_by_the_other_at_once(
    replicas: tuple[str, str, str], cluster: ThrowawayCluster, make_token: Callable[..., str]
) -> None:
    a, b, prefix = replicas
    user, admin = make_token("reader"), make_token("operator", admin=True)
    assert call(b, "GET", "/regions", token=user)[2] == {"regions": ["us-east-1"]}  # now cached for 300 s
    # The namespace's generation counter and its entry sit in one slot (one MGET on one node).
    tag = hash_tag(IMAGES_CACHE_NAMESPACE)
    [holder] = [keys for keys in keys_by_node(cluster, f"{prefix}cache:").values() if keys]
    assert {f"{prefix}cache:{tag}:gen", f"{prefix}cache:{tag}:active"} <= holder
    image = {"ami_id": "ami-2", "active": True, "instance_type": "g4dn.xlarge", "mandelbox_capacity": 4}
    assert call(a, "PUT", "/admin/images/eu-west-1/abc123", token=admin, body=image)[0] == 200
    assert call(b, "GET", "/regions", token=user)[2] == {"regions": ["eu-west-1", "us-east-1"]}
    assert call(a, "PUT", "/admin/images/us-east-1/abc123", token=admin, body={**image, "active": False})[0] == 200
    assert call(b, "GET", "/regions", token=user)[2] == {"regions": ["eu-west-1"]}
    status, _, body = call(b, "POST", "/mandelbox/assign", token=make_token("late"), body=ASSIGN_BODY)
    assert (status, body["error"]) == (422, "REGION_NOT_ENABLED")


@pytest.mark.usefixtures("fleet")
def test_no_capacity_on_a_replica_nudges_a_scaler_in_another_process(
    replicas: tuple[str, str, str],
    cluster: ThrowawayCluster,
    committed_factory: SessionFactory,
    make_token: Callable[..., str],
    settings: Settings,
) -> None:
    a, _, prefix = replicas
    scaler_side = build_nudge(Settings(**{**settings.model_dump(), "redis_url": cluster.url, "redis_prefix": prefix}))
    assert isinstance(scaler_side, RedisNudge)
    scaler_side.wait(0)
    assert scaler_side.wait(0.2) is False
    with committed_factory() as session:
        session.get(Instance, "i-shared").status = InstanceStatus.DRAINING  # type: ignore[union-attr]
        session.commit()
    status, _, body = call(a, "POST", "/mandelbox/assign", token=make_token("nudger"), body=ASSIGN_BODY)
    assert (status, body["error"]) == (503, "NO_INSTANCE_AVAILABLE")
    assert scaler_side.wait(5) is True
    assert scaler_side.wait(0.2) is False  # one nudge wakes one wait


def test_failure_budgets_and_newsletter_limits_count_in_the_cluster_and_keys_spread_over_the_masters(
    cluster: ThrowawayCluster,
    make_app: Callable[..., APIFlask],
    factories: Factories,
    user_headers: Callable[..., dict[str, str]],
    smtp_server: SmtpServer,
) -> None:
    """In-process apps (the module-level limiter serves one app at a time here, so sharing is shown by the replica
    processes above): each budget is enforced, and its counter is a key in the cluster holding the count."""
    prefix = unique_prefix()
    common: dict[str, Any] = {"redis_url": cluster.url, "redis_prefix": prefix}
    instance, secret = factories.instance(status=InstanceStatus.PRE_CONNECTION)
    host = make_app("host", handshake_failure_rate_limit="3 per minute", **common).test_client()
    body = {"instance_name": instance.instance_name, "ip": "10.9.9.9", "client_commit_hash": "abc123"}
    body["mandelbox_capacity"] = 4

    def handshake(credential: str) -> int:
        answer = host.post("/host/handshake", json=body, headers={"Authorization": f"Bearer {credential}"})
        return int(answer.status_code)

    assert [handshake(f"guess-{n}") for n in range(4)] == [401, 401, 401, 429]
    assert handshake(secret) == 200  # the right secret is never refused

    public = make_app("public", newsletter_rate_limit="2 per minute", smtp_url=smtp_server.url, **common)
    statuses = [
        public.test_client().post("/newsletter/subscribe", json={"email": f"n{n}@example.com"}).status_code
        for n in range(3)
    ]
    assert statuses == [202, 202, 429]

    # Per-user assign limits (one key each) land wherever their keys hash: over more than one master.
    factories.image()
    public = make_app("public", assign_rate_limit="5 per minute", **common)
    for n in range(12):
        client = public.test_client()
        assert client.get("/regions", headers=user_headers(f"spread-{n}")).status_code == 200
        client.post("/mandelbox/assign", json={"regions": ["nowhere-1"], "client_commit_hash": "x"},
                    headers=user_headers(f"spread-{n}"))  # fmt: skip

    counts: dict[str, int] = {}
    holders: dict[int, int] = {}
    for port, keys in keys_by_node(cluster, f"{prefix}limits").items():
        node = cluster.node(port)
        try:
            counts.update({key: int(node.get(key) or 0) for key in keys})
        finally:
            node.close()
        holders[port] = len(keys)
    by_scope = {scope: [count for key, count in counts.items() if f"{scope}/" in key]
                for scope in ("host-auth-failures", "newsletter", "assign")}  # fmt: skip
    assert sorted(by_scope["host-auth-failures"]) == [3, 3], counts  # the address and the instance name
    assert by_scope["newsletter"] == [3], counts  # one client address; the refused third counts too
    assert sorted(by_scope["assign"]) == [1] * 12, counts
    assert sum(1 for held in holders.values() if held) >= 2, holders


@pytest.mark.usefixtures("fleet")
def test_a_stopped_master_degrades_like_redis_down(
    cluster: ThrowawayCluster,
    replicas: tuple[str, str, str],
    make_app: Callable[..., APIFlask],
    committed_factory: SessionFactory,
    make_token: Callable[..., str],
    user_headers: Callable[..., dict[str, str]],
    settings: Settings,
) -> None:
    a, b, prefix = replicas
    admin = make_token("operator", admin=True)
    in_process = make_app("public", factory=committed_factory, redis_url=cluster.url, redis_prefix=prefix)
    client = in_process.test_client()
    # Warm every path on the cluster first: the cache entry, the limits, readiness.
    assert call(a, "GET", "/regions", token=make_token("warm"))[0] == 200
    assert client.get("/readyz").status_code == 200
    tag = hash_tag(IMAGES_CACHE_NAMESPACE)
    # Stop the master that holds the cache's slot: every cached read then goes to the stopped node.
    holders = keys_by_node(cluster, f"{prefix}cache:")
    [victim] = [port for port, keys in holders.items() if f"{prefix}cache:{tag}:gen" in keys]
    process = cluster.processes[cluster.ports.index(victim)]
    others = [port for port in cluster.ports if port != victim]
    answers: list[tuple[str, str, int, float]] = []  # (phase, what, status, seconds)
    image = {"ami_id": "ami-9", "active": True, "instance_type": "g4dn.xlarge", "mandelbox_capacity": 4}

    def timed(phase: str, what: str, request: Callable[[], int]) -> None:
        started = time.monotonic()
        status = request()
        answers.append((phase, what, status, time.monotonic() - started))

    def round_of_requests(phase: str, new_region: str) -> None:
        for base in (a, b):
            token = make_token(f"{phase}-{base[-5:]}")
            timed(
                phase,
                "assign",
                lambda url=base, t=token: call(url, "POST", "/mandelbox/assign", token=t, body=ASSIGN_BODY)[0],
            )
            timed(phase, "regions", lambda url=base, t=token: call(url, "GET", "/regions", token=t)[0])
        headers = user_headers(f"{phase}-in-process")
        timed(phase, "assign", lambda: client.post("/mandelbox/assign", json=ASSIGN_BODY, headers=headers).status_code)
        path = f"/admin/images/{new_region}/abc123"
        timed(phase, "image change", lambda: call(a, "PUT", path, token=admin, body=image)[0])
        # An image with no host yet: the usual 503, and its scaler nudge fails quietly.
        room = {**ASSIGN_BODY, "regions": [new_region]}
        timed(phase, "no room", lambda: call(b, "POST", "/mandelbox/assign", token=make_token(phase), body=room)[0])

    os.kill(process.pid, signal.SIGSTOP)
    try:
        round_of_requests("stopped", "us-west-1")  # the other masters still serve their slots
        cluster.wait_for_state("fail", ports=others)  # the cluster noticed: every node refuses (CLUSTERDOWN)
        round_of_requests("cluster-down", "us-west-2")
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json["checks"]["redis"] == "unavailable"
        # The scaler side's wait ends within its bound too (a BLPOP on a stopped node waits out the waiter's read
        # timeout, MAX_BLOCK_S + 2), never raising.
        scaler = build_nudge(Settings(**{**settings.model_dump(), "redis_url": cluster.url, "redis_prefix": prefix}))
        started = time.monotonic()
        scaler.wait(0.5)
        assert time.monotonic() - started < MAX_BLOCK_S + 2 + 1
    finally:
        os.kill(process.pid, signal.SIGCONT)
    expected = {"assign": 201, "regions": 200, "image change": 200, "no room": 503}
    assert [(phase, what, status) for phase, what, status, _ in answers] == [
        (phase, what, expected[what]) for phase, what, _, _ in answers
    ], answers
    assert max(seconds for *_, seconds in answers) < OUTAGE_ANSWER_BOUND_S, answers
    cluster.wait_for_state("ok")
    with committed_factory() as session:
        assert session.scalar(select(func.count()).select_from(Mandelbox)) == 6  # every assign above
    assert isinstance(in_process.extensions["fractal"].redis, LazyRedisCluster)
    assert client.get("/readyz").status_code == 200  # the same client uses the cluster again


def test_an_app_starts_and_assigns_while_no_cluster_node_answers(
    make_app: Callable[..., APIFlask], factories: Factories, user_headers: Callable[..., dict[str, str]]
) -> None:
    """Building the cluster client reads the topology; an app must not need that to start (Redis is optional)."""
    factories.image()
    factories.instance(instance_name="roomy", mandelbox_capacity=10)
    factories.image(region="eu-west-1")
    dead = "redis+cluster://127.0.0.1:1,127.0.0.1:2"
    public = make_app("public", redis_url=dead, redis_prefix=unique_prefix()).test_client()
    started = time.monotonic()
    assert public.get("/regions", headers=user_headers()).status_code == 200
    assert public.post("/mandelbox/assign", json=ASSIGN_BODY, headers=user_headers("a")).status_code == 201
    no_room = public.post("/mandelbox/assign", json={**ASSIGN_BODY, "regions": ["eu-west-1"]}, headers=user_headers())
    assert (no_room.status_code, no_room.json["error"]) == (503, "NO_INSTANCE_AVAILABLE")
    ready = public.get("/readyz")
    assert ready.status_code == 503 and ready.json["checks"]["redis"] == "unavailable"
    assert time.monotonic() - started < OUTAGE_ANSWER_BOUND_S
