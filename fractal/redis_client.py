"""The one Redis client an app uses for readiness, caching and rate limits (built lazily, never at import)."""

from __future__ import annotations

import redis

from fractal.config import Settings

# Redis only makes things faster or fairer, so an unreachable Redis must cost little: fail fast.
REDIS_CONNECT_TIMEOUT_S = 0.5
REDIS_SOCKET_TIMEOUT_S = 0.5


def build_redis_client(settings: Settings) -> redis.Redis[bytes] | None:
    """A client for ``REDIS_URL`` with short timeouts, or None when Redis is not configured.

    redis-py connects on first use, so building the client never touches the network.
    """
    if not settings.redis_url:
        return None
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        health_check_interval=30,
    )
