"""REDIS_URL=rediss+cluster://: a real three-master Redis Cluster that speaks only TLS (to clients and on its bus),
with a certificate from a throwaway CA. The limits and the cache use it like the plain cluster; a client that
cannot verify the nodes' certificate degrades like Redis down instead of talking in clear or trusting anyone."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import redis
from apiflask import APIFlask
from redis.backoff import NoBackoff
from redis.retry import Retry

from fractal.redis_client import LazyRedisCluster
from test.factories import Factories
from test.redis_support import ThrowawayCluster, throwaway_redis_cluster, unique_prefix

pytestmark = pytest.mark.slow
ASSIGN_BODY = {"regions": ["us-east-1"], "client_commit_hash": "abc123"}
OUTAGE_ANSWER_BOUND_S = 3.0


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[ThrowawayCluster]:
    with throwaway_redis_cluster(tls=True) as started:
        yield started


def test_limits_and_cache_live_in_the_tls_cluster_shared_by_two_apps(
    tls_cluster: ThrowawayCluster,
    make_app: Callable[..., APIFlask],
    factories: Factories,
    user_headers: Callable[..., dict[str, str]],
) -> None:
    factories.image()
    factories.instance(instance_name="roomy", mandelbox_capacity=10)
    prefix = unique_prefix()
    a, b = (
        make_app(
            "public",
            redis_url=tls_cluster.url,
            redis_prefix=prefix,
            assign_rate_limit="2 per minute",
            max_mandelboxes_per_user=100,
        )
        for _ in range(2)
    )
    assert isinstance(a.extensions["fractal"].redis, LazyRedisCluster)
    clients = a.test_client(), b.test_client()
    statuses = [client.post("/mandelbox/assign", json=ASSIGN_BODY, headers=user_headers("tls-user")).status_code
                for client in (clients[0], clients[1])]  # fmt: skip
    assert statuses == [201, 201]
    refused = clients[0].post("/mandelbox/assign", json=ASSIGN_BODY, headers=user_headers("tls-user"))
    assert (refused.status_code, refused.json["error"]) == (429, "RATE_LIMITED")  # the count is the cluster's
    ready = clients[1].get("/readyz")
    assert ready.status_code == 200 and ready.json["checks"]["redis"] == "ok"

    found: set[str] = set()
    for port in tls_cluster.ports:  # over TLS, with the CA; a clear-text client is not even answered
        node = tls_cluster.node(port)
        try:
            found |= {key.decode() for key in node.scan_iter(match=f"{prefix}*", count=500)}
        finally:
            node.close()
        clear_text = redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.ConnectionError):
            clear_text.ping()
    assert any("limits" in key for key in found) and any("cache" in key for key in found), found


def test_a_node_certificate_the_client_cannot_verify_degrades_like_redis_down(
    tls_cluster: ThrowawayCluster,
    make_app: Callable[..., APIFlask],
    factories: Factories,
    user_headers: Callable[..., dict[str, str]],
) -> None:
    """Without ssl_ca_certs the system's CAs are used, and they never signed the throwaway one: no connection is
    made (ssl_cert_reqs defaults to required), the limits fall back to memory and assignment goes on."""
    factories.image()
    factories.instance(instance_name="roomy", mandelbox_capacity=10)
    unverifiable = tls_cluster.url.split("?", 1)[0]
    public = make_app("public", redis_url=unverifiable, redis_prefix=unique_prefix()).test_client()
    started = time.monotonic()
    assert public.post("/mandelbox/assign", json=ASSIGN_BODY, headers=user_headers("a")).status_code == 201
    ready = public.get("/readyz")
    assert ready.status_code == 503 and ready.json["checks"]["redis"] == "unavailable"
    assert time.monotonic() - started < OUTAGE_ANSWER_BOUND_S
