"""JWKS against a real HTTP endpoint on loopback: rotation k1 → k2+k1 → k2 costs no 401s, a removed key stops being
trusted within the JWKS lifetime, one fetch in flight, failures remembered briefly, waits bounded."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import werkzeug
from pytest_httpserver import HTTPServer

from fractal.auth.dev_keys import DevKeyPair, generate_keypair, mint_token
from fractal.auth.tokens import JwtVerifier, UserClaims
from fractal.errors import UnauthorizedError

JWKS_PATH = "/.well-known/jwks.json"


def jwk(pair: DevKeyPair, kid: str) -> dict[str, Any]:
    public = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).prepare_key(pair.public_pem)
    return {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public)), "kid": kid, "use": "sig", "alg": "RS256"}


class Issuer:
    """What the JWKS endpoint publishes right now, how often it was asked, and how it misbehaves."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.requests = 0
        self.delay_s = 0.0
        self.failing = False
        self._lock = threading.Lock()

    def handle(self, _request: werkzeug.Request) -> werkzeug.Response:
        with self._lock:
            self.requests += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.failing:
            return werkzeug.Response("down", status=500)
        return werkzeug.Response(json.dumps({"keys": self.published}), content_type="application/json")


@pytest.fixture
def issuer(httpserver: HTTPServer) -> Iterator[Issuer]:
    state = Issuer()
    httpserver.expect_request(JWKS_PATH).respond_with_handler(state.handle)
    yield state


def verifier(httpserver: HTTPServer, **options: Any) -> JwtVerifier:
    return JwtVerifier(jwks_url=httpserver.url_for(JWKS_PATH), **options)


def token(pair: DevKeyPair, kid: str) -> str:
    return mint_token(pair.private_pem, user_id=f"u-{uuid.uuid4().hex[:8]}", kid=kid)


def test_rotation_costs_no_401_and_a_removed_key_stops_being_trusted(httpserver: HTTPServer, issuer: Issuer) -> None:
    k1, k2 = generate_keypair(), generate_keypair()
    check = verifier(httpserver, jwks_lifetime_s=1.0, jwks_refresh_cooldown_s=0.2)
    issuer.published = [jwk(k1, "k1")]
    old_token = token(k1, "k1")
    assert check.verify(old_token).user_id.startswith("u-")
    assert issuer.requests == 1

    # The issuer publishes k2 beside k1 and starts signing with it. Past the short cooldown after the last fetch,
    # the first k2 token refetches at once and verifies: no 401 window.
    issuer.published = [jwk(k2, "k2"), jwk(k1, "k1")]
    time.sleep(0.3)
    assert check.verify(token(k2, "k2")).user_id.startswith("u-")
    assert issuer.requests == 2
    assert check.verify(token(k1, "k1"))  # k1 still published: still good, no fetch
    assert issuer.requests == 2

    # The issuer removes k1 (say it leaked). Within the JWKS lifetime tokens signed with it are refused, the
    # already-verified (cached) one included.
    issuer.published = [jwk(k2, "k2")]
    time.sleep(1.1)
    with pytest.raises(UnauthorizedError):
        check.verify(old_token)  # seen (and cached) before: past the lifetime it is checked against the issuer again
    with pytest.raises(UnauthorizedError):
        check.verify(token(k1, "k1"))
    assert check.verify(token(k2, "k2")).user_id.startswith("u-")


def test_made_up_kids_cost_one_fetch_per_cooldown(httpserver: HTTPServer, issuer: Issuer) -> None:
    k1, stranger = generate_keypair(), generate_keypair()
    issuer.published = [jwk(k1, "k1")]
    check = verifier(httpserver, jwks_refresh_cooldown_s=30)
    check.verify(token(k1, "k1"))
    for n in range(20):
        with pytest.raises(UnauthorizedError):
            check.verify(token(stranger, f"made-up-{n}"))
    assert issuer.requests == 1  # the first fetch was moments ago: an unknown kid after it is a plain 401


def test_one_fetch_in_flight_for_concurrent_first_requests(httpserver: HTTPServer, issuer: Issuer) -> None:
    k1 = generate_keypair()
    issuer.published = [jwk(k1, "k1")]
    issuer.delay_s = 0.5  # a slow endpoint, right after a fresh start
    check = verifier(httpserver)
    results: list[UserClaims | Exception] = []

    def call() -> None:
        try:
            results.append(check.verify(token(k1, "k1")))
        except Exception as error:  # collected and asserted below
            results.append(error)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(result, UserClaims) for result in results), results
    assert issuer.requests == 1


def test_a_failing_endpoint_is_remembered_briefly(httpserver: HTTPServer, issuer: Issuer) -> None:
    k1 = generate_keypair()
    issuer.failing = True
    check = verifier(httpserver, jwks_refresh_cooldown_s=30)
    for _ in range(10):
        with pytest.raises(UnauthorizedError):
            check.verify(token(k1, "k1"))
    assert issuer.requests == 1  # not one fetch per request, each waiting on the dead endpoint in turn


def test_a_slow_endpoint_is_waited_for_only_so_long(httpserver: HTTPServer, issuer: Issuer) -> None:
    k1 = generate_keypair()
    issuer.published = [jwk(k1, "k1")]
    issuer.delay_s = 2.0
    check = verifier(httpserver, jwks_timeout_s=0.3)
    with pytest.raises(UnauthorizedError):
        check.verify(token(k1, "k1"))  # would verify after 2 s if the wait were not bounded
