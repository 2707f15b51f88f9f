"""Rate limits in one process: per-user assign limit, failed-attempt limit per address, per-address limit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from apiflask import APIBlueprint, APIFlask
from flask import request

from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.errors import HostMismatchError, UnauthorizedError
from fractal.factory import create_app
from fractal.ratelimit import limit_failed_handshakes, newsletter_rate_limit
from test.factories import Factories
from test.redis_support import REDIS_SERVER_URL, delete_prefixed, unique_prefix

Headers = Callable[..., dict[str, str]]
ASSIGN = {"regions": ["us-east-1"], "client_commit_hash": "abc123"}

# Stand-ins for the host handshake and the newsletter endpoints (built on other branches), decorated exactly
# as those will be.
probe_blueprint = APIBlueprint("ratelimit_probe", __name__)


@probe_blueprint.post("/probe/handshake")
@limit_failed_handshakes
def probe_handshake() -> dict[str, str]:
    secret = request.headers.get("X-Secret")
    if secret == "wrong-host":
        raise HostMismatchError()
    if secret != "good":
        raise UnauthorizedError()
    return {"status": "ACTIVE"}


@probe_blueprint.post("/probe/newsletter")
@newsletter_rate_limit
def probe_newsletter() -> tuple[dict[str, str], int]:
    return {}, 202


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = unique_prefix()
    yield prefix
    delete_prefixed(REDIS_SERVER_URL, prefix)


@pytest.fixture(params=["memory", "redis"])
def probe_app(
    request: pytest.FixtureRequest, settings: Settings, session_factory: SessionFactory, redis_prefix: str
) -> APIFlask:
    overrides: dict[str, Any] = {"handshake_failure_rate_limit": "3 per minute", "newsletter_rate_limit": "2 per hour"}
    if request.param == "redis":
        overrides.update(redis_url=REDIS_SERVER_URL, redis_prefix=redis_prefix)
    app_settings = Settings(**{**settings.model_dump(), **overrides})
    return create_app(blueprints=[probe_blueprint], settings=app_settings, session_factory=session_factory)


def test_only_401s_count_and_a_good_secret_is_never_refused(probe_app: APIFlask) -> None:
    client = probe_app.test_client()
    for _ in range(5):  # successes never count
        assert client.post("/probe/handshake", headers={"X-Secret": "good"}).status_code == 200
    assert client.post("/probe/handshake", headers={"X-Secret": "bad"}).status_code == 401
    for _ in range(5):  # a conflict is not a failed authentication (one LOST host behind a NAT blocks nobody)
        assert client.post("/probe/handshake", headers={"X-Secret": "wrong-host"}).status_code == 409
    assert client.post("/probe/handshake", headers={"X-Secret": "good"}).status_code == 200
    assert client.post("/probe/handshake", headers={"X-Secret": "bad"}).status_code == 401
    assert client.post("/probe/handshake").status_code == 401  # third failure: budget used up
    refused = client.post("/probe/handshake", headers={"X-Secret": "bad"})
    assert refused.status_code == 429
    assert refused.json["error"] == "RATE_LIMITED"
    assert int(refused.headers["Retry-After"]) >= 1
    # The right secret from the same address still works.
    assert client.post("/probe/handshake", headers={"X-Secret": "good"}).status_code == 200
    # Another address has its own budget.
    other = client.post("/probe/handshake", headers={"X-Secret": "bad"}, environ_base={"REMOTE_ADDR": "10.9.9.9"})
    assert other.status_code == 401


def test_newsletter_limit_counts_every_request_per_address(probe_app: APIFlask) -> None:
    client = probe_app.test_client()
    assert [client.post("/probe/newsletter").status_code for _ in range(3)] == [202, 202, 429]
    assert client.post("/probe/newsletter", environ_base={"REMOTE_ADDR": "10.1.1.1"}).status_code == 202


def test_limit_keys_live_under_the_prefix(
    settings: Settings, session_factory: SessionFactory, redis_prefix: str
) -> None:
    app_settings = Settings(**{**settings.model_dump(), "redis_url": REDIS_SERVER_URL, "redis_prefix": redis_prefix})
    app = create_app(blueprints=[probe_blueprint], settings=app_settings, session_factory=session_factory)
    app.test_client().post("/probe/newsletter")
    keys = redis.Redis.from_url(REDIS_SERVER_URL).keys(f"{redis_prefix}*")
    assert keys and all(key.decode().startswith(f"{redis_prefix}limits") for key in keys)


def test_assign_limit_is_per_verified_user(
    make_app: Callable[..., APIFlask], factories: Factories, user_headers: Headers
) -> None:
    factories.image()
    factories.instance(mandelbox_capacity=10)
    client = make_app("public", assign_rate_limit="2 per minute", max_mandelboxes_per_user=10).test_client()
    codes = [client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u1")).status_code for _ in range(3)]
    assert codes == [201, 201, 429]
    response = client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u1"))
    assert response.status_code == 429
    assert set(response.json) == {"error", "message", "details"} and response.json["error"] == "RATE_LIMITED"
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["X-RateLimit-Limit"] == "2"
    # Same address, another user: their own budget. A bad token is 401, never counted as anyone.
    assert client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u2")).status_code == 201
    assert client.post("/mandelbox/assign", json=ASSIGN, headers={"Authorization": "Bearer x"}).status_code == 401


def test_unreachable_redis_fails_open_with_a_warning(
    make_app: Callable[..., APIFlask], factories: Factories, user_headers: Headers, capfd: pytest.CaptureFixture[str]
) -> None:
    factories.image()
    factories.instance(mandelbox_capacity=10)
    dead = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    client = make_app(
        "public", redis_url=dead, assign_rate_limit="2 per minute", max_mandelboxes_per_user=10
    ).test_client()
    codes = [client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u1")).status_code for _ in range(3)]
    # The in-memory fallback still applies the limit in this process.
    assert codes == [201, 201, 429]
    logged = capfd.readouterr().err
    assert "falling back to in-memory storage" in logged and '"level": "warning"' in logged


def test_assign_limit_carries_the_image_summary_read_in_one_redis_round_trip(
    make_app: Callable[..., APIFlask],
    factories: Factories,
    user_headers: Headers,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    factories.image()
    factories.instance(mandelbox_capacity=10)
    app = make_app(
        "public",
        redis_url=REDIS_SERVER_URL,
        redis_prefix=redis_prefix,
        assign_rate_limit="3 per minute",
        max_mandelboxes_per_user=10,
    )
    client = app.test_client()
    assert client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u1")).status_code == 201  # cached now
    sent: list[bytes] = []
    send = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(command if isinstance(command, bytes) else b"".join(command))
        send(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    assert client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u1")).status_code == 201
    assert len(sent) == 1 and b"EVALSHA" in sent[0] and b"MGET" in sent[0]
    # Counted as before: the third assign is the last the limit allows.
    codes = [client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u1")).status_code for _ in range(2)]
    assert codes == [201, 429]
    # What the read brought back is judged as the cache judges it: an image change is seen at once.
    state = app.extensions["fractal"]
    factories.image(region="eu-west-1")
    assert state.cache.invalidate("images") is True
    eu = {"regions": ["eu-west-1"], "client_commit_hash": "abc123"}
    assert client.post("/mandelbox/assign", json=eu, headers=user_headers("u2")).status_code == 503  # not 422


def test_assign_limit_counts_when_the_server_lost_its_script(
    make_app: Callable[..., APIFlask],
    factories: Factories,
    user_headers: Headers,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fractal.ratelimit import limiter

    factories.image()
    factories.instance(mandelbox_capacity=10)
    client = make_app(
        "public",
        redis_url=REDIS_SERVER_URL,
        redis_prefix=redis_prefix,
        assign_rate_limit="2 per minute",
        max_mandelboxes_per_user=10,
    ).test_client()
    # A digest the server never saw answers NOSCRIPT, as after a Redis restart (without flushing the shared
    # server's scripts): limits' own call loads the script and counts.
    script: Any = limiter.limiter.storage.lua_incr_expire
    monkeypatch.setattr(script, "sha", "0" * 40)
    codes = [client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u1")).status_code for _ in range(3)]
    assert codes == [201, 201, 429]
    # In Redis, not the memory fallback: the counter is shared by every replica.
    assert limiter._storage_dead is False
    (counter,) = redis.Redis.from_url(REDIS_SERVER_URL).keys(f"{redis_prefix}limits*user:u1*")
    assert redis.Redis.from_url(REDIS_SERVER_URL).get(counter) == b"3"
