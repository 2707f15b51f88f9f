"""The Redis clients Fractal uses (built lazily, never at import): one server, or a Redis Cluster.

``REDIS_URL=redis://…`` names one server (redis-py's ``Redis.from_url``); ``redis+cluster://host:port[,host:port…]``
names a Redis Cluster, any listed node seeding the topology (redis-py's ``RedisCluster``), and
``rediss+cluster://…[?ssl_ca_certs=…]`` the same over TLS. Either client connects on
first use, so an app starts while Redis is down, and fails fast: Redis only makes things faster or fairer.

Keys that one command or script must see together carry a hash tag (``{…}``) so they share a cluster slot; every
other key lands wherever it hashes, spreading the load over the masters.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Union

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.connection import Encoder
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from fractal.config import Settings, is_redis_cluster_url, parse_redis_cluster_url

# Redis only makes things faster or fairer, so an unreachable Redis must cost little: fail fast.
REDIS_CONNECT_TIMEOUT_S = 0.5
REDIS_SOCKET_TIMEOUT_S = 0.5
# A cluster whose topology could not be read is not asked again for this long (each try may cost a timeout per node).
CLUSTER_RETRY_S = 2.0
# What a Redis call may raise: a cluster client also raises RedisClusterException (not a RedisError) when no node
# can be reached while it refreshes its topology.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)


def hash_tag(name: str) -> str:
    """``{name}``: every key containing it hashes to the same cluster slot (for multi-key commands and scripts)."""
    return "{" + name + "}"


class LazyRedisCluster:
    """A ``RedisCluster`` built on first use, standing in for it (attribute access is forwarded).

    redis-py's constructor reads the cluster's slots at once and raises when no node answers; this wrapper defers
    that to the first command, so an app starts (degraded) while the cluster is down, and a failed attempt is not
    repeated for ``CLUSTER_RETRY_S``. Commands do not retry: a node that times out or refuses fails that command
    (the callers degrade), and the client refreshes its view of the cluster for the next one.
    """

    def __init__(self, url: str, *, socket_timeout: float) -> None:
        parsed = parse_redis_cluster_url(url)
        self._options: dict[str, Any] = {
            "startup_nodes": [ClusterNode(host, port) for host, port in parsed.nodes],
            "username": parsed.username,
            "password": parsed.password,
            "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
            "socket_timeout": socket_timeout,
            "retry": Retry(NoBackoff(), 0),
            # A master down leaves its slots uncovered: keys elsewhere still work (until the cluster itself stops
            # serving), so do not refuse to build the client for it.
            "require_full_coverage": False,
            "health_check_interval": 30,
        }
        if parsed.tls:  # rediss+cluster://: every node, the ones discovered from the topology too, over TLS
            self._options |= {
                "ssl": True,
                "ssl_ca_certs": parsed.ssl_ca_certs,
                "ssl_cert_reqs": parsed.ssl_cert_reqs,
            }
        self._lock = threading.Lock()
        self._client: RedisCluster[bytes] | None = None
        self._retry_at = 0.0

    def cluster(self) -> RedisCluster[bytes]:
        """The underlying client, built now if need be; redis.ConnectionError while the cluster is unreachable."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                if time.monotonic() < self._retry_at:
                    raise redis.ConnectionError("Redis Cluster unreachable (not retried yet)")
                try:
                    self._client = RedisCluster(**self._options)
                except REDIS_ERRORS as exc:
                    self._retry_at = time.monotonic() + CLUSTER_RETRY_S
                    raise redis.ConnectionError(f"Redis Cluster unreachable: {type(exc).__name__}") from exc
            return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cluster(), name)

    # What Lua scripts need before the first command, answered without connecting (limits registers its scripts
    # when the app is built).
    def get_encoder(self) -> Encoder:
        return Encoder("utf-8", "strict", False)

    def register_script(self, script: str) -> Script:
        return Script(self, script)

    def ping(self, **kwargs: Any) -> bool:
        """PING every master (a plain cluster PING asks one random node, which says nothing about the others)."""
        kwargs.setdefault("target_nodes", RedisCluster.PRIMARIES)
        return bool(self.cluster().ping(**kwargs))

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


RedisClient = Union["redis.Redis[bytes]", LazyRedisCluster]


def connect(url: str, *, socket_timeout: float = REDIS_SOCKET_TIMEOUT_S) -> RedisClient:
    """A client for ``url`` (one server or ``redis+cluster://``) with short timeouts; connects on first use."""
    if is_redis_cluster_url(url):
        return LazyRedisCluster(url, socket_timeout=socket_timeout)
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        socket_timeout=socket_timeout,
        health_check_interval=30,
    )


def build_redis_client(settings: Settings) -> RedisClient | None:
    """The app's client for ``REDIS_URL`` (readiness, cache, and the rate limits on a cluster), or None when Redis
    is not configured. Building it never touches the network."""
    if not settings.redis_url:
        return None
    return connect(settings.redis_url)
