"""Rate limits (Flask-Limiter): shared by every replica through Redis, in memory without it.

One module-level :data:`limiter` carries the route decorators; ``init_rate_limits`` binds it to each app in
the factory. Keys: the verified JWT ``sub`` on user routes (the decorator goes *under* ``@user_required``, so
the limit is counted after authentication and a forged token can never spend another user's budget), the
client address on public or host routes.

Redis unreachable: the limiter falls back to per-process in-memory counters (logging a warning, and
re-checking Redis with backoff), and any other storage error is logged and swallowed: limits fail open,
requests never fail because of them.

Behind a reverse proxy the client address is ``request.remote_addr`` as fixed by the WSGI server or
werkzeug's ProxyFix; without that every client shares the proxy's address.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, g, request
from flask_limiter import Limiter, RateLimitExceeded, RouteLimit

from fractal.config import Settings
from fractal.errors import RateLimitedError, error_response
from fractal.redis_client import REDIS_CONNECT_TIMEOUT_S, REDIS_SOCKET_TIMEOUT_S
from fractal.web import settings

# Statuses that count as a failed host authentication attempt (bad secret, wrong host).
FAILED_AUTH_STATUSES = frozenset({401, 409})


def client_address_key() -> str:
    """Rate-limit key for public and unauthenticated routes: the client's address."""
    return f"addr:{request.remote_addr or 'unknown'}"


def user_key() -> str:
    """Rate-limit key for user routes: the verified ``sub`` (needs ``@user_required`` to have run first)."""
    user = g.get("user")
    if user is None:
        return client_address_key()
    return f"user:{user.user_id}"


class FractalLimiter(Limiter):
    """A Limiter that can be bound to several apps built in one process (tests build many).

    Flask-Limiter keeps storage state on the extension, not per app: forget the previous app's storage
    options and outage flag so each app gets the storage its own settings name.
    """

    def init_app(self, app: Flask) -> None:
        self._storage_options = {}
        self._storage_dead = False
        super().init_app(app)


# Headers on every answer would cost two more Redis round trips per request (the window's count and TTL), and
# the limiter would overwrite other answers' Retry-After (the 503 NO_INSTANCE_AVAILABLE one): only refusals
# carry rate-limit headers (Retry-After, X-RateLimit-Limit), written by the 429 handler below.
limiter = FractalLimiter(
    key_func=client_address_key,
    headers_enabled=False,
    strategy="fixed-window",
    swallow_errors=True,
    in_memory_fallback_enabled=True,
)


def init_rate_limits(app: Flask, app_settings: Settings) -> None:
    """Bind :data:`limiter` to ``app``: Redis storage (under the key prefix) or memory, and the 429 handler."""
    options: dict[str, Any] = {}
    if app_settings.redis_url:
        options = {
            "key_prefix": f"{app_settings.redis_prefix}limits",
            "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
            "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
        }
    app.config.update(
        RATELIMIT_STORAGE_URI=app_settings.redis_url or "memory://",
        RATELIMIT_STORAGE_OPTIONS=options,
    )
    limiter.init_app(app)
    app.register_error_handler(RateLimitExceeded, _rate_limited)


def _rate_limited(error: RateLimitExceeded) -> Response:
    retry_after = 1
    try:
        current = limiter.current_limit
        if current is not None:
            retry_after = max(1, math.ceil(current.reset_at - time.time()))
    except Exception:  # the storage just failed: a 1 s hint is better than none
        retry_after = 1
    response = error_response(RateLimitedError(details={"limit": str(error.limit.limit)}, retry_after_s=retry_after))
    response.headers["X-RateLimit-Limit"] = str(error.limit.limit.amount)
    return response


def user_limit(limit: Callable[[], str], *, scope: str) -> RouteLimit:
    """Limit a user route per verified user; apply it *below* ``@user_required``."""
    return limiter.limit(limit, key_func=user_key, scope=scope)


def address_limit(limit: Callable[[], str], *, scope: str) -> RouteLimit:
    """Limit a public route per client address (every request counts)."""
    return limiter.limit(limit, key_func=client_address_key, scope=scope)


def failed_attempts_limit(
    limit: Callable[[], str], *, scope: str, statuses: Iterable[int] = FAILED_AUTH_STATUSES
) -> RouteLimit:
    """Limit only *failed* attempts per client address (brute force), shared by every route it decorates.

    A request is refused with 429 once the address has used up its failures in the window, whatever its
    credentials; answers with one of ``statuses`` count, successes never do. Apply it *above* the
    decorator that authenticates, so that the check happens before a secret is even looked at.
    """
    failing = frozenset(statuses)
    return limiter.shared_limit(
        limit,
        scope=scope,
        key_func=client_address_key,
        deduct_when=lambda response: response.status_code in failing,
    )


# Ready-made decorators for the routes that need them.
assign_rate_limit = user_limit(lambda: settings().assign_rate_limit, scope="assign")
handshake_failure_limit = failed_attempts_limit(
    lambda: settings().handshake_failure_rate_limit, scope="host-auth-failures"
)
newsletter_rate_limit = address_limit(lambda: settings().newsletter_rate_limit, scope="newsletter")
