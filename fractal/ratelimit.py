"""Rate limits: shared by every replica through Redis, in memory without it (Flask-Limiter's storages, our decorator).

One module-level :data:`limiter` holds the storage (bound to each app by ``init_rate_limits`` in the factory);
:func:`route_limit` decorators count through its strategy. Keys: the verified JWT ``sub`` on user routes (the
decorator goes *under* ``@user_required``, so the limit is counted after authentication and a forged token can
never spend another user's budget), the client address on public or host routes.

Redis unreachable: the limiter falls back to per-process in-memory counters (logging a warning, and
re-checking Redis with backoff), and any other storage error is logged and swallowed: limits fail open,
requests never fail because of them.

On a Redis Cluster (``REDIS_URL=redis+cluster://…``) the limits live in the cluster through the app's own lazily
connecting cluster client (limits' Redis Cluster storage would read the topology while the app is built, so an
app could not start with the cluster down). Every counter is one key and one Lua script on it, so limits spread
over the masters with no hash tag; the storage counts as down when any master does not answer.

Behind a reverse proxy the client address is ``request.remote_addr`` as fixed by the WSGI server or
werkzeug's ProxyFix; without that every client shares the proxy's address.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from flask import Flask, Response, g, request
from flask_limiter import Limiter
from limits import RateLimitItem, parse_many
from limits import parse as parse_limit
from limits.storage import RedisClusterStorage, RedisStorage, Storage
from limits.strategies import FixedWindowRateLimiter, RateLimiter
from redis.exceptions import NoScriptError

from fractal.cache import ReadAhead
from fractal.config import Settings
from fractal.errors import RateLimitedError, UnauthorizedError, error_response
from fractal.redis_client import REDIS_CONNECT_TIMEOUT_S, REDIS_SOCKET_TIMEOUT_S, LazyRedisCluster, RedisClient
from fractal.web import settings

# A claimed instance name longer than the column cannot exist: not worth a key of its own.
MAX_INSTANCE_NAME_KEY = 128
F = TypeVar("F", bound=Callable[..., Any])


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


# The storage scheme under which the app hands limits its own cluster client (never seen in any setting).
CLUSTER_CLIENT_SCHEME = "fractal+redis+cluster"


class ClusterClientStorage(RedisClusterStorage):
    """limits' Redis Cluster storage on a :class:`LazyRedisCluster` the app built (so nothing connects yet)."""

    STORAGE_SCHEME = [CLUSTER_CLIENT_SCHEME]

    def __init__(self, uri: str, *, client: LazyRedisCluster, key_prefix: str, **_options: Any) -> None:
        Storage.__init__(self, uri)
        self.key_prefix = key_prefix
        self.target_server = "redis"
        self.dependency = self.dependencies["redis"].module
        self.storage = client  # registering the Lua scripts below does not connect either
        self.initialize_storage(uri)


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


def init_rate_limits(app: Flask, app_settings: Settings, redis_client: RedisClient | None = None) -> None:
    """Bind :data:`limiter` to ``app``: Redis storage (under the key prefix) or memory, and the 429 handler.

    On a cluster the limits use ``redis_client`` (the app's :class:`LazyRedisCluster`); on one server limits builds
    its own client from the URL."""
    uri = app_settings.redis_url or "memory://"
    options: dict[str, Any] = {}
    if isinstance(redis_client, LazyRedisCluster):
        uri = f"{CLUSTER_CLIENT_SCHEME}://"
        options = {"client": redis_client, "key_prefix": f"{app_settings.redis_prefix}limits"}
    elif app_settings.redis_url:
        options = {
            "key_prefix": f"{app_settings.redis_prefix}limits",
            "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
            "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
        }
    app.config.update(RATELIMIT_STORAGE_URI=uri, RATELIMIT_STORAGE_OPTIONS=options)
    limiter.init_app(app)
    _drop_request_hooks(app)
    _storage_health.reset()
    app.register_error_handler(RouteRateLimitedError, _rate_limited)


def _drop_request_hooks(app: Flask) -> None:
    """Flask-Limiter is kept for its storages (Redis, Redis Cluster, memory fallback) and strategy; every Fractal
    limit is a :func:`route_limit` decorator that checks itself, so the hooks Flask-Limiter installs on every
    request (a before_request check for default/application/blueprint limits, an after_request header and
    deduction pass, a teardown resetting its per-request context) would only cost CPU on every request."""
    registries: tuple[dict[Any, list[Any]], ...] = (
        app.before_request_funcs,
        app.after_request_funcs,
        app.teardown_request_funcs,
    )
    for registry in registries:
        for name, hooks in registry.items():
            registry[name] = [hook for hook in hooks if not _is_limiter_hook(hook)]


def _is_limiter_hook(hook: Callable[..., Any]) -> bool:
    # before_request and teardown are bound methods of the limiter; after_request is
    # functools.partial(Limiter.__inject_headers, limiter).
    if isinstance(hook, functools.partial):
        return hook.args[:1] == (limiter,)
    return getattr(hook, "__self__", None) is limiter


class RouteRateLimitedError(RateLimitedError):
    """A route limit refused the request: 429 with Retry-After and X-RateLimit-Limit."""

    def __init__(self, item: RateLimitItem, retry_after_s: int) -> None:
        super().__init__(details={"limit": str(item)}, retry_after_s=retry_after_s)
        self.amount = item.amount


def _rate_limited(error: RouteRateLimitedError) -> Response:
    response = error_response(error)
    response.headers["X-RateLimit-Limit"] = str(error.amount)
    return response


class _StorageHealth:
    """Flask-Limiter's fallback, for the route decorators: the first storage error switches every limit to the
    per-process memory storage (one warning); Redis is re-checked with exponential backoff (1, 2, 4 … 32 s, then
    from 1 s again) and used again once it answers."""

    MAX_BACKOFF_EXPONENT = 5

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._last_check = 0.0
        self._checks = 0

    def mark_dead(self) -> None:
        limiter.logger.warning("Rate limit storage unreachable - falling back to in-memory storage")
        limiter._storage_dead = True
        self._last_check = time.time()
        self._checks = 0

    def maybe_recover(self) -> None:
        now = time.time()
        if now - self._last_check <= 2 ** min(self._checks, self.MAX_BACKOFF_EXPONENT):
            return
        self._last_check = now
        self._checks = 0 if self._checks >= self.MAX_BACKOFF_EXPONENT else self._checks + 1
        storage = limiter._storage
        if storage is not None and storage.check():
            limiter.logger.info("Rate limit storage recovered")
            limiter._storage_dead = False


_storage_health = _StorageHealth()


@functools.lru_cache(maxsize=64)
def _parsed(limit: str) -> tuple[RateLimitItem, ...]:
    return tuple(sorted(parse_many(limit)))


def _spend(
    items: tuple[RateLimitItem, ...], key: str, scope: str, along: ReadAhead | None = None
) -> RouteRateLimitedError | None:
    """Count one request against each limit (one Redis round trip each: limits' INCR+EXPIRE script on one key)
    in order, up to the first that is spent: its refusal, else None. ``along``: a read sent in the first count's
    round trip when the limits live on one Redis server (see :func:`_hit_with`). What was counted is remembered
    for :func:`give_back_route_limit`."""
    strategy = limiter.limiter
    for n, item in enumerate(items):
        hit = _hit_with(strategy, item, key, scope, along) if n == 0 and along is not None else None
        if hit is None:
            hit = strategy.hit(item, key, scope)
        if not hit:
            g.fractal_route_limit_spent = (items[: n + 1], key, scope)  # a refused hit is counted too
            reset = strategy.get_window_stats(item, key, scope).reset_time  # only refusals pay this round trip
            limiter.logger.info("ratelimit %s (%s) exceeded at endpoint: %s", item, key, scope)
            return RouteRateLimitedError(item, retry_after_s=max(1, math.ceil(reset - time.time())))
    g.fractal_route_limit_spent = (items, key, scope)
    return None


def _hit_with(strategy: RateLimiter, item: RateLimitItem, key: str, scope: str, along: ReadAhead) -> bool | None:
    """``strategy.hit(item, key, scope)`` with ``along``'s command in the same round trip (a pipeline of two), its
    reply handed to ``along``; None when that cannot be done here (storage other than limits' fixed window on one
    Redis server, such as the memory fallback or a cluster, where the two keys need not share a node; the script
    not loaded on the server yet): the caller counts as usual, and ``along`` reads in a round trip of its own.

    The count is limits' own: the INCR+EXPIRE script that ``RedisStorage.incr`` runs, on the key it would use, so
    every replica and every other path sees one counter. Errors of the round trip are raised as limits' would be
    (the caller's fallback handles them) after ``along`` learns of them.
    """
    storage = strategy.storage
    if type(storage) is not RedisStorage or type(strategy) is not FixedWindowRateLimiter:
        return None
    sha: str = storage.lua_incr_expire.sha  # type: ignore[attr-defined]  # types-redis's Script lacks it
    pipeline = storage.storage.pipeline(transaction=False)
    # EVALSHA by hand: a Script object in a pipeline makes redis-py ask SCRIPT EXISTS first (another round trip).
    counter = storage.prefixed_key(item.key_for(key, scope))
    pipeline.execute_command("EVALSHA", sha, 1, counter, item.get_expiry(), 1)
    pipeline.execute_command(*along.command)
    try:
        count, reply = pipeline.execute(raise_on_error=False)
    except Exception as exc:
        along.received(exc)
        raise
    along.received(reply)
    if isinstance(count, NoScriptError):
        return None  # the server lost its scripts (a restart): limits' own call loads it, then counts
    if isinstance(count, Exception):
        raise count
    return int(count) <= item.amount


def give_back_route_limit() -> None:
    """Uncount what this request spent of its route limit (a request found, once counted, to be exempt: the
    assign's replay of a stored answer). One Redis round trip (the same script, cost -1); at most once per
    request; storage errors are logged and swallowed like every limit's."""
    spent: tuple[tuple[RateLimitItem, ...], str, str] | None = g.pop("fractal_route_limit_spent", None)
    if spent is None:
        return
    items, key, scope = spent
    try:
        for item in items:
            limiter.limiter.hit(item, key, scope, cost=-1)
    except Exception:
        limiter.logger.exception("Failed to give back a rate limit hit. Swallowing error")


def check_route_limit(
    limit: str,
    *,
    key: str,
    scope: str,
    exempt_if_refused: Callable[[], bool] | None = None,
    along: ReadAhead | None = None,
) -> None:
    """Count this request against ``limit`` (limits' syntax, ``;``-separated for several) under ``key`` and
    ``scope``; raise :class:`RouteRateLimitedError` when spent. Storage errors never fail the request: the first
    switches to memory (see :class:`_StorageHealth`), any later one is logged and the request goes through.
    ``exempt_if_refused``: asked only when the limit refuses; True lets the request through, its count given back.
    ``along``: a cache read to send in the count's round trip when it can be (see :func:`_hit_with`).
    """
    if not limiter.enabled:
        return
    items = _parsed(limit)
    if limiter._storage_dead:
        _storage_health.maybe_recover()
    try:
        refusal = _spend(items, key, scope, along)
    except Exception:
        if limiter._storage_dead or not limiter._in_memory_fallback_enabled:
            limiter.logger.exception("Failed to rate limit. Swallowing error")
            return
        _storage_health.mark_dead()
        try:
            refusal = _spend(items, key, scope)
        except Exception:
            limiter.logger.exception("Failed to rate limit. Swallowing error")
            return
    if refusal is not None:
        if exempt_if_refused is not None and exempt_if_refused():
            give_back_route_limit()
            return
        raise refusal


def route_limit(
    limit: Callable[[], str],
    *,
    key_func: Callable[[], str],
    scope: str,
    exempt_when: Callable[[], bool] | None = None,
    exempt_if_refused: Callable[[], bool] | None = None,
    read_ahead: Callable[[], ReadAhead | None] | None = None,
) -> Callable[[F], F]:
    """Decorate a view: each call counts against ``limit()`` per ``key_func()`` (Redis keys and windows as
    Flask-Limiter's fixed window: ``LIMITER/<key>/<scope>/<amount>/<multiples>/<granularity>``, one key, so one
    cluster slot). ``exempt_when`` True: not counted (nor refused). ``exempt_if_refused``: for exemptions that are
    rare and cost a lookup, asked only when the limit refuses (True: the request goes through, its count given
    back); the view gives back the count itself (:func:`give_back_route_limit`) when it finds the request exempt.
    ``read_ahead``: called before counting; the cache read it returns (kept by the view) travels in the count's
    round trip when it can."""

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if exempt_when is None or not exempt_when():
                along = read_ahead() if read_ahead is not None else None
                check_route_limit(
                    limit(), key=key_func(), scope=scope, exempt_if_refused=exempt_if_refused, along=along
                )
            return view(*args, **kwargs)

        return cast(F, wrapper)

    return decorate


def user_limit(
    limit: Callable[[], str],
    *,
    scope: str,
    exempt_when: Callable[[], bool] | None = None,
    exempt_if_refused: Callable[[], bool] | None = None,
    read_ahead: Callable[[], ReadAhead | None] | None = None,
) -> Callable[[F], F]:
    """Limit a user route per verified user; apply it *below* ``@user_required``. ``exempt_when`` True: not counted
    (nor refused); ``exempt_if_refused`` and ``read_ahead``: see :func:`route_limit`."""
    return route_limit(
        limit,
        key_func=user_key,
        scope=scope,
        exempt_when=exempt_when,
        exempt_if_refused=exempt_if_refused,
        read_ahead=read_ahead,
    )


def address_limit(limit: Callable[[], str], *, scope: str) -> Callable[[F], F]:
    """Limit a public route per client address (every request counts)."""
    return route_limit(limit, key_func=client_address_key, scope=scope)


class FailureBudget:
    """Failed authentication attempts, counted per key (address, claimed instance name) in the limiter's storage.

    Unlike a route limit it is consulted only *after* the credentials were checked and found wrong: a correct
    secret is never refused because others failed from its address or for its name (the secrets are 256-bit
    random values, so the budget bounds the cost of guessing, not its odds). Storage errors fail open.
    """

    def __init__(self, limit: Callable[[], str], *, scope: str) -> None:
        self._limit = limit
        self._scope = scope

    def refusal(self, keys: Iterable[str]) -> RateLimitedError | None:
        """Count one failure against each key; a RateLimitedError when one of them had none left."""
        try:
            item = parse_limit(self._limit())
            strategy = limiter.limiter
            keys = list(keys)
            spent = [key for key in keys if not strategy.test(item, self._scope, key)]
            if spent:
                reset = max(strategy.get_window_stats(item, self._scope, key).reset_time for key in spent)
                return RateLimitedError(
                    "Too many failed attempts; retry later.",
                    details={"limit": str(item)},
                    retry_after_s=max(1, math.ceil(reset - time.time())),
                )
            for key in keys:
                strategy.hit(item, self._scope, key)
        except Exception:  # limits never fail a request: without storage, failures are simply not counted
            return None
        return None


# Ready-made decorators for the routes that need them.
handshake_failures = FailureBudget(lambda: settings().handshake_failure_rate_limit, scope="host-auth-failures")


def limit_failed_handshakes(view: F) -> F:
    """Put *above* ``@host_required``: a 401 counts against the client address and the claimed instance name, and
    once either has no failures left a wrong secret answers 429 instead. 409s and successes never count."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return view(*args, **kwargs)
        except UnauthorizedError:
            keys = [client_address_key()]
            body = request.get_json(silent=True)
            name = body.get("instance_name") if isinstance(body, dict) else None
            if isinstance(name, str) and 0 < len(name) <= MAX_INSTANCE_NAME_KEY:
                keys.append(f"instance:{name}")
            refusal = handshake_failures.refusal(keys)
            if refusal is not None:
                raise refusal from None
            raise

    return cast(F, wrapper)


newsletter_rate_limit = address_limit(lambda: settings().newsletter_rate_limit, scope="newsletter")
