"""A short-lived cache of read-mostly plain data, shared by every replica through Redis when configured.

Services receive a :class:`DataCache` as an argument (this module imports no flask at module level); the
app builds one per process with Flask-Caching (`RedisCache` with ``REDIS_URL``, else an in-process
`SimpleCache`).

Invalidation bumps a generation counter per namespace instead of deleting keys: every entry records the
generation it was loaded under, and readers fetch the counter and the entry in one round trip (MGET), using
the entry only when the generations match. A reader that loaded old rows just before a change can then only
write them tagged with the old generation, which no reader accepts any more, so a change is visible to every
replica at once (delete-on-change would let such a reader re-cache stale data).

Values are JSON in Redis, never pickle: unpickling what Redis holds would turn write access to Redis into code
execution in every API process. An entry that is not ours (a pickle, garbage) reads as a miss.

On a Redis Cluster the counter and the entries of one namespace share a slot (the namespace is a hash tag,
``cache:{images}:gen``), so that MGET is one command on one node; different namespaces spread over the masters.

A Redis outage never fails a request: the cache is bypassed (the loader reads the database) and, for a few
seconds after a failure, not even tried, so a dead Redis costs one failed round trip, not one per lookup.

A read can travel in another command's round trip (:meth:`DataCache.read_ahead`: the assign's rate limit carries
the image summary's MGET): a round trip costs an assign more CPU (syscalls, the wake-up, redis-py's per-command
path) than the MGET itself. What came back is judged exactly as :meth:`DataCache.get_or_load` judges its own read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import redis
import structlog
from cachelib.redis_base import BaseRedisCache
from cachelib.serializers import BaseRedisSerializer

from fractal.redis_client import hash_tag

if TYPE_CHECKING:
    from cachelib import BaseCache
    from flask import Flask

    from fractal.config import Settings
    from fractal.redis_client import RedisClient

log = structlog.get_logger(__name__)

T = TypeVar("T")
# After a failed Redis round trip the cache is skipped for this long.
OUTAGE_BACKOFF_S = 5.0


class JsonRedisSerializer(BaseRedisSerializer):
    """cachelib's Redis value format with JSON instead of pickle (integers stay plain for INCR)."""

    def dumps(self, value: Any, protocol: int | None = None) -> bytes:
        if type(value) is int:  # the generation counters: INCR needs plain digits
            return str(value).encode("ascii")
        return b"j" + json.dumps(value, separators=(",", ":")).encode()

    def loads(self, value: bytes | None) -> Any:
        if value is None:
            return None
        if value.startswith(b"j"):
            try:
                return json.loads(value[1:])
            except ValueError:
                return None
        try:
            return int(value)
        except ValueError:
            return None  # a pickle ("!...") or anything else we did not write: a miss, never unpickled


class CacheReader(Protocol):
    """What services read through: a :class:`DataCache`, or a :class:`ReadAhead` standing in for it."""

    def get_or_load(self, namespace: str, name: str, load: Callable[[], T]) -> T: ...


class DataCache:
    """get-or-load and namespace invalidation over a cachelib backend; never raises for backend failures."""

    def __init__(self, backend: BaseCache | None, *, ttl_s: int, one_server: bool = False) -> None:
        """``one_server``: the backend is a cachelib Redis cache on one Redis server (not a cluster), so its reads
        can travel with other commands to that server (:meth:`read_ahead`)."""
        # ttl 0 would mean "never expire" to cachelib; here it means "do not cache".
        self._backend = backend if ttl_s > 0 else None
        if isinstance(getattr(backend, "serializer", None), BaseRedisSerializer):
            backend.serializer = JsonRedisSerializer()  # type: ignore[union-attr]
        self._ttl_s = ttl_s
        self._skip_until = 0.0
        self._one_server = one_server

    @property
    def enabled(self) -> bool:
        return self._backend is not None

    def get_or_load(self, namespace: str, name: str, load: Callable[[], T]) -> T:
        """The cached value of ``namespace``/``name``, or ``load()`` (then cached for the TTL)."""
        backend = self._available()
        if backend is None:
            return load()
        key = _entry_key(namespace, name)
        try:
            # One round trip: the namespace's generation and the entry, which records the generation it was
            # loaded under. An entry from an older generation is stale, however recently it was written.
            raw_generation, entry = backend.get_many(_generation_key(namespace), key)
        except Exception as exc:  # any backend failure means "bypass", never a failed request
            self._failed("cache_read_failed", exc)
            return load()
        return self._resolve(backend, key, raw_generation, entry, load)

    def read_ahead(self, namespace: str, name: str) -> ReadAhead | None:
        """``namespace``/``name``'s read as one Redis command, for a caller to send in another command's round trip
        and hand back (:meth:`ReadAhead.received`); the ReadAhead then answers in this cache's place. None when
        the backend is not one Redis server (in-process, a cluster: the entry and the other command's key would not
        share a node) or is being skipped after a failure: the caller then sends nothing extra."""
        backend = self._available() if self._one_server else None
        if not isinstance(backend, BaseRedisCache) or not isinstance(backend.key_prefix, str):
            return None
        prefix = backend.key_prefix
        keys = (prefix + _generation_key(namespace), prefix + _entry_key(namespace, name))
        return ReadAhead(self, backend, namespace, name, keys)

    def _resolve(self, backend: BaseCache, key: str, raw_generation: Any, entry: Any, load: Callable[[], T]) -> T:
        """The value from what one read returned (the namespace's generation and the entry), else ``load()``,
        then cached under the generation read."""
        generation = int(raw_generation) if raw_generation is not None else 0
        # [generation, value]: a list, as JSON gives it back (values must be JSON: plain dicts, lists, strings).
        if isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] == generation:
            return entry[1]  # type: ignore[no-any-return]
        value = load()
        try:
            backend.set(key, [generation, value], timeout=self._ttl_s)
        except Exception as exc:
            self._failed("cache_write_failed", exc)
        return value

    def invalidate(self, namespace: str) -> bool:
        """Make every cached value of ``namespace`` stale for all replicas; False if the backend failed."""
        backend = self._backend
        if backend is None:
            return True
        try:
            if backend.inc(_generation_key(namespace)) is None:
                raise RuntimeError("generation counter not incremented")
        except Exception as exc:
            # Other replicas may serve the old value until the TTL ends; nothing more can be done now.
            self._failed("cache_invalidation_failed", exc, namespace=namespace)
            return False
        return True

    def _available(self) -> BaseCache | None:
        if self._backend is None or time.monotonic() < self._skip_until:
            return None
        return self._backend

    def _failed(self, event: str, exc: BaseException, **extra: Any) -> None:
        if time.monotonic() >= self._skip_until:
            log.warning(event, error_type=type(exc).__name__, bypass_s=OUTAGE_BACKOFF_S, **extra)
        self._skip_until = time.monotonic() + OUTAGE_BACKOFF_S


class ReadAhead:
    """One entry's read (an MGET of its namespace's generation and the entry) sent by another caller in a round trip
    of its own, standing in for the cache for the rest of the request: that entry is answered from the reply as
    :meth:`DataCache.get_or_load` would answer it; anything else, or everything when no reply was received (the
    other command was not sent: no Redis storage, a memory fallback), through the cache as usual."""

    def __init__(self, cache: DataCache, backend: BaseCache, namespace: str, name: str, keys: tuple[str, str]) -> None:
        self.command: tuple[str, ...] = ("MGET", *keys)
        self._cache = cache
        self._backend = backend
        self._namespace = namespace
        self._name = name
        self._reply: Any = None
        self._error: Exception | None = None

    def received(self, reply: Any) -> None:
        """The reply to :attr:`command` (or the exception its round trip raised, a failed read like any other)."""
        if isinstance(reply, Exception):
            self._error = reply
        else:
            self._reply = reply

    def get_or_load(self, namespace: str, name: str, load: Callable[[], T]) -> T:
        """:meth:`DataCache.get_or_load`, answered from the reply for the entry read ahead."""
        if (namespace, name) != (self._namespace, self._name) or (self._reply is None and self._error is None):
            return self._cache.get_or_load(namespace, name, load)
        reply, error = self._reply, self._error
        self._reply = self._error = None  # one answer per read: a second lookup reads afresh
        if error is None:
            try:  # what cachelib's get_many does with the same reply
                loads = self._backend.serializer.loads  # type: ignore[attr-defined]
                raw_generation, entry = (loads(value) for value in reply)
            except Exception as exc:  # anything but the pair of values we wrote is a failed read, never a 500
                error = exc
        if error is not None:
            self._cache._failed("cache_read_failed", error)
            return load()
        return self._cache._resolve(self._backend, _entry_key(namespace, name), raw_generation, entry, load)


def _entry_key(namespace: str, name: str) -> str:
    """An entry's key (without the backend's prefix); the hash tag shares the slot of the namespace's counter."""
    return f"{hash_tag(namespace)}:{name}"


def _generation_key(namespace: str) -> str:
    """The namespace's generation counter; the hash tag puts it in the slot of the namespace's entries."""
    return f"{hash_tag(namespace)}:gen"


def init_cache(app: Flask, settings: Settings, redis_client: RedisClient | None) -> DataCache:
    """Flask-Caching for ``app``: RedisCache on the app's Redis client when configured, else SimpleCache."""
    from flask_caching import Cache

    config: dict[str, Any] = {
        "CACHE_DEFAULT_TIMEOUT": settings.cache_ttl_s,
        "CACHE_KEY_PREFIX": f"{settings.redis_prefix}cache:",
    }
    if redis_client is not None:
        # Handing over the client (not the URL) shares its short timeouts and connection pool.
        config.update(CACHE_TYPE="RedisCache", CACHE_REDIS_HOST=redis_client)
    else:
        config.update(CACHE_TYPE="SimpleCache", CACHE_THRESHOLD=1000)
    cache = Cache(config=config)
    cache.init_app(app)
    backend: BaseCache = app.extensions["cache"][cache]
    return DataCache(backend, ttl_s=settings.cache_ttl_s, one_server=isinstance(redis_client, redis.Redis))
