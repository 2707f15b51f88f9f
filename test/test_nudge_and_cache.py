"""The scaler nudge (in-process and across processes on real Redis) and the data cache's contract."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from apiflask import APIFlask
from cachelib import RedisCache, SimpleCache

from fractal.cache import DataCache
from fractal.config import Settings
from fractal.nudge import LocalNudge, RedisNudge, build_nudge
from test.factories import Factories
from test.redis_support import REDIS_SERVER_URL, ROOT, delete_prefixed, unique_prefix

Headers = Callable[..., dict[str, str]]


@pytest.fixture
def redis_settings(settings: Settings) -> Iterator[Settings]:
    prefix = unique_prefix()
    yield Settings(**{**settings.model_dump(), "redis_url": REDIS_SERVER_URL, "redis_prefix": prefix})
    delete_prefixed(REDIS_SERVER_URL, prefix)


def test_local_nudge_wakes_a_waiting_thread(settings: Settings) -> None:
    nudge = build_nudge(settings)
    assert isinstance(nudge, LocalNudge)
    assert build_nudge(settings) is nudge  # one per process: the apps and the scaler loop in it share it
    nudge.wait(0)  # earlier tests' no-capacity answers may have nudged this process already
    assert nudge.wait(0.05) is False
    threading.Timer(0.1, nudge.nudge).start()
    started = time.monotonic()
    assert nudge.wait(5) is True
    assert time.monotonic() - started < 2
    assert nudge.wait(0) is False


@pytest.mark.slow
def test_redis_nudge_crosses_processes(redis_settings: Settings) -> None:
    waiter_code = textwrap.dedent(f"""
        import time
        from fractal.nudge import build_nudge
        from fractal.config import Settings
        nudge = build_nudge(Settings(redis_url={REDIS_SERVER_URL!r}, redis_prefix={redis_settings.redis_prefix!r}))
        print("waiting", flush=True)
        started = time.monotonic()
        print(nudge.wait(10), round(time.monotonic() - started, 2), flush=True)
    """)
    waiter = subprocess.Popen([sys.executable, "-c", waiter_code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert waiter.stdout is not None and waiter.stdout.readline().strip() == "waiting"
        time.sleep(0.3)
        build_nudge(redis_settings).nudge()
        woke, elapsed = waiter.stdout.readline().split()
        assert woke == "True" and float(elapsed) < 5
    finally:
        if waiter.poll() is None:
            waiter.kill()
        waiter.wait(timeout=5)


def test_redis_nudges_coalesce_and_persist_until_waited_for(redis_settings: Settings) -> None:
    sender, scaler = build_nudge(redis_settings), build_nudge(redis_settings)
    assert isinstance(sender, RedisNudge)
    for _ in range(3):
        sender.nudge("us-east-1", "abc")  # accepts on_no_capacity's arguments
    assert scaler.wait(1) is True
    assert scaler.wait(0.2) is False


def test_redis_nudge_on_a_dead_port_never_raises(settings: Settings) -> None:
    nudge = build_nudge(Settings(**{**settings.model_dump(), "redis_url": "redis://127.0.0.1:1/0"}))
    nudge.nudge()  # logged, not raised
    assert nudge.wait(0.2) is True  # the in-process fallback still saw it
    assert nudge.wait(0.1) is False


def test_no_capacity_assign_nudges_the_scaler(
    make_app: Callable[..., APIFlask], factories: Factories, user_headers: Headers, redis_settings: Settings
) -> None:
    factories.image()
    app = make_app("public", redis_url=REDIS_SERVER_URL, redis_prefix=redis_settings.redis_prefix)
    scaler = build_nudge(redis_settings)
    assert scaler.wait(0) is False
    response = app.test_client().post(
        "/mandelbox/assign", json={"regions": ["us-east-1"], "client_commit_hash": "abc123"}, headers=user_headers()
    )
    assert response.status_code == 503
    assert scaler.wait(2) is True


@pytest.mark.parametrize("shared", [False, True])
def test_cache_serves_until_invalidated(shared: bool, redis_settings: Settings) -> None:
    client: Any = redis.Redis.from_url(REDIS_SERVER_URL)
    backend: Any = (
        RedisCache(host=client, key_prefix=f"{redis_settings.redis_prefix}cache:") if shared else SimpleCache()
    )
    cache = DataCache(backend, ttl_s=60)
    loads: list[int] = []

    def load() -> dict[str, int]:
        loads.append(1)
        return {"n": len(loads)}

    assert cache.get_or_load("ns", "v", load) == {"n": 1}
    assert cache.get_or_load("ns", "v", load) == {"n": 1}
    assert cache.invalidate("ns") is True
    assert cache.get_or_load("ns", "v", load) == {"n": 2}
    assert len(loads) == 2


def test_cache_with_ttl_zero_never_caches() -> None:
    cache = DataCache(SimpleCache(), ttl_s=0)
    values = iter(range(10))
    assert [cache.get_or_load("ns", "v", lambda: next(values)) for _ in range(3)] == [0, 1, 2]


def test_cache_outage_is_bypassed_then_skipped() -> None:
    dead: Any = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    cache = DataCache(RedisCache(host=dead), ttl_s=60)
    values = iter(range(10))
    started = time.monotonic()
    assert [cache.get_or_load("ns", "v", lambda: next(values)) for _ in range(3)] == [0, 1, 2]
    assert cache.invalidate("ns") is False
    assert time.monotonic() - started < 2


class _Explodes:
    """What an attacker with write access to Redis would plant: unpickling it runs code (here: makes a file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_cached_values_are_json_and_a_planted_pickle_is_never_loaded(redis_settings: Settings, tmp_path: Any) -> None:
    import pickle

    client: Any = redis.Redis.from_url(REDIS_SERVER_URL)
    prefix = f"{redis_settings.redis_prefix}cache:"
    cache = DataCache(RedisCache(host=client, key_prefix=prefix), ttl_s=60)
    assert cache.get_or_load("ns", "v", lambda: {"regions": ["us-east-1"]}) == {"regions": ["us-east-1"]}
    stored = client.get(f"{prefix}{{ns}}:v")
    assert stored.startswith(b"j") and json.loads(stored[1:]) == [0, {"regions": ["us-east-1"]}]

    marker = tmp_path / "pwned"
    client.set(f"{prefix}{{ns}}:v", b"!" + pickle.dumps(_Explodes(str(marker))))
    assert cache.get_or_load("ns", "v", lambda: {"regions": ["eu-west-1"]}) == {"regions": ["eu-west-1"]}
    assert not marker.exists(), "the cache unpickled a value from Redis"


def test_a_read_sent_ahead_is_answered_as_the_cache_answers(redis_settings: Settings) -> None:
    client: Any = redis.Redis.from_url(REDIS_SERVER_URL)
    cache = DataCache(
        RedisCache(host=client, key_prefix=f"{redis_settings.redis_prefix}cache:"), ttl_s=60, one_server=True
    )
    loads: list[int] = []

    def load() -> dict[str, int]:
        loads.append(1)
        return {"n": len(loads)}

    def sent_ahead() -> Any:
        read = cache.read_ahead("ns", "v")
        assert read is not None
        read.received(client.execute_command(*read.command))  # what another command's round trip brings back
        return read

    assert sent_ahead().get_or_load("ns", "v", load) == {"n": 1}  # a miss: loaded and cached
    assert sent_ahead().get_or_load("ns", "v", load) == {"n": 1}
    assert cache.get_or_load("ns", "v", load) == {"n": 1}  # the same entry for plain readers
    assert cache.invalidate("ns") is True
    assert sent_ahead().get_or_load("ns", "v", load) == {"n": 2}  # stale by its generation
    read = cache.read_ahead("ns", "v")
    assert read is not None
    assert read.get_or_load("ns", "other", lambda: "x") == "x"  # another entry: through the cache
    assert read.get_or_load("ns", "v", load) == {"n": 2}  # nothing received: through the cache
    assert len(loads) == 2


def test_a_read_sent_ahead_that_failed_is_a_failed_read(redis_settings: Settings) -> None:
    client: Any = redis.Redis.from_url(REDIS_SERVER_URL)
    cache = DataCache(
        RedisCache(host=client, key_prefix=f"{redis_settings.redis_prefix}cache:"), ttl_s=60, one_server=True
    )
    read = cache.read_ahead("ns", "v")
    assert read is not None
    read.received(redis.ConnectionError("gone"))
    assert read.get_or_load("ns", "v", lambda: "loaded") == "loaded"
    assert cache.read_ahead("ns", "v") is None  # skipped for a while, like after any failed read


@pytest.mark.parametrize("reply", [[b"1"], ["1", "j[1,2]"], None, 7])
def test_a_read_sent_ahead_answered_with_anything_else_is_a_failed_read(redis_settings: Settings, reply: Any) -> None:
    client: Any = redis.Redis.from_url(REDIS_SERVER_URL)
    cache = DataCache(
        RedisCache(host=client, key_prefix=f"{redis_settings.redis_prefix}cache:"), ttl_s=60, one_server=True
    )
    read = cache.read_ahead("ns", "v")
    assert read is not None
    read.received(reply)
    assert read.get_or_load("ns", "v", lambda: "loaded") == "loaded"


def test_only_one_redis_server_reads_ahead() -> None:
    assert DataCache(SimpleCache(), ttl_s=60).read_ahead("ns", "v") is None
    cluster_like: Any = redis.Redis.from_url(REDIS_SERVER_URL)
    assert DataCache(RedisCache(host=cluster_like), ttl_s=60).read_ahead("ns", "v") is None  # not said: one server
