"""User tokens from a real identity provider: node-oidc-provider (npm, pinned in test/oidc_provider/package-lock.json)
issuing RS256 JWT access tokens (RFC 9068) for our audience through resource indicators and the client_credentials
grant, its signing keys rotated k1 → k2+k1 → k2 as a deployment would (a restart with a new key set).

The provider is installed once into .test-services/oidc/ with `npm ci` (bounded; a failed install fails the test:
this file must run under ./commands test, never skip) and reinstalled when the lock file changes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from apiflask import APIFlask
from cryptography.hazmat.primitives.asymmetric import rsa

from test.processes import ROOT, StartedProcess, start_gunicorn, wait_until_ready
from test.servers import wait_for_port
from test.throwaway import free_port

SOURCE = ROOT / "test" / "oidc_provider"
INSTALL_DIR = ROOT / ".test-services" / "oidc"
INSTALL_TIMEOUT_S = 300
AUDIENCE = "https://api.fractal.test"
USER = ("fractal-user", "user-secret")  # a client without the admin scope: its tokens are a user's
OPERATOR = ("fractal-operator", "operator-secret")  # granted the admin scope


@pytest.fixture(scope="session")
def oidc_install() -> Path:
    """node-oidc-provider installed from the committed lock file (npm ci), reused while the lock is unchanged."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed for the identity-provider tests (./commands test installs them)")
    lock = (SOURCE / "package-lock.json").read_bytes()
    stamp = INSTALL_DIR / ".installed-lock-sha256"
    digest = hashlib.sha256(lock + (SOURCE / "package.json").read_bytes()).hexdigest()
    if not (stamp.exists() and stamp.read_text() == digest and (INSTALL_DIR / "node_modules").is_dir()):
        INSTALL_DIR.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(SOURCE / name, INSTALL_DIR / name)
        try:
            result = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=INSTALL_DIR,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"npm ci of node-oidc-provider took longer than {INSTALL_TIMEOUT_S} s")
        if result.returncode != 0:
            pytest.fail(f"npm ci of node-oidc-provider failed:\n{result.stdout}\n{result.stderr}")
        stamp.write_text(digest)
    # ES modules resolve imports next to the script: it runs from the install directory.
    shutil.copyfile(SOURCE / "server.mjs", INSTALL_DIR / "server.mjs")
    return INSTALL_DIR


def signing_key(kid: str) -> dict[str, Any]:
    """A private RSA JWK the provider signs with (and publishes the public half of)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
    # oidc-provider 8 looks the signing key up among keys usable for "verify": say both.
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256", "key_ops": ["sign", "verify"]}


class Provider:
    """One node-oidc-provider on a fixed loopback port; restart() swaps its key set (the first key signs)."""

    def __init__(self, directory: Path, log_dir: Path) -> None:
        self.directory = directory
        self.log_dir = log_dir
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.started: StartedProcess | None = None
        self.jwks_uri = ""

    def start(self, keys: list[dict[str, Any]], *, jwks_delay_ms: int = 0) -> None:
        self.stop()
        keys_file = self.log_dir / f"jwks-{uuid.uuid4().hex[:8]}.json"
        keys_file.write_text(json.dumps({"keys": keys}))
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "OIDC_PORT": str(self.port),
            "OIDC_AUDIENCE": AUDIENCE,
            "OIDC_JWKS_FILE": str(keys_file),
            "OIDC_JWKS_DELAY_MS": str(jwks_delay_ms),
            "DEBUG": "",
        }
        log_path = self.log_dir / f"oidc-{self.port}-{keys_file.stem}.log"
        log = log_path.open("wb")
        node = shutil.which("node") or "node"
        process = subprocess.Popen(
            [node, "server.mjs"], cwd=self.directory, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        self.started = StartedProcess(process=process, port=self.port, log_path=log_path, _log=log)
        try:
            wait_for_port(self.port, timeout_s=15)
        except TimeoutError:
            raise AssertionError(f"oidc-provider did not start:\n{self.started.log_text()}") from None
        self.jwks_uri = self._get("/.well-known/openid-configuration")["jwks_uri"]

    def stop(self) -> None:
        if self.started is not None:
            self.started.stop(timeout_s=5)
            self.started = None

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.issuer + path, timeout=5) as response:
            return json.loads(response.read())

    def jwks_requests(self) -> int:
        requests: int = self._get("/test/stats")["jwks_requests"]
        return requests

    def token(self, client: tuple[str, str], *, scope: str | None = None) -> str:
        """An access token from the token endpoint (client_credentials, resource = our audience)."""
        form = {"grant_type": "client_credentials", "resource": AUDIENCE, **({"scope": scope} if scope else {})}
        basic = base64.b64encode(f"{client[0]}:{client[1]}".encode()).decode()
        request = urllib.request.Request(
            self.issuer + "/token",
            data=urllib.parse.urlencode(form).encode(),
            headers={"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise AssertionError(f"token endpoint: {error.code} {error.read()!r}") from None
        assert answer["token_type"] == "Bearer"
        token: str = answer["access_token"]
        return token


@pytest.fixture
def provider(oidc_install: Path, tmp_path: Path) -> Iterator[Provider]:
    running = Provider(oidc_install, tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def oidc_app(make_app: Callable[..., APIFlask], provider: Provider) -> Callable[..., APIFlask]:
    """An app that trusts the provider: its discovered jwks_uri, its issuer, our audience."""

    def build(kind: str = "public", **overrides: Any) -> APIFlask:
        trust = {"jwt_public_key": None, "jwks_url": provider.jwks_uri, "jwt_issuer": provider.issuer}
        return make_app(kind, **{**trust, "jwt_audience": AUDIENCE, **overrides})

    return build


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def kid_of(token: str) -> str:
    kid: str = jwt.get_unverified_header(token)["kid"]
    return kid


def test_provider_tokens_work_on_the_public_api_and_admin_scope_on_the_admin_api(
    provider: Provider, oidc_app: Callable[..., APIFlask]
) -> None:
    provider.start([signing_key("k1")])
    public, admin = oidc_app("public").test_client(), oidc_app("admin").test_client()
    user_token = provider.token(USER)
    operator_token = provider.token(OPERATOR, scope="admin")
    claims = jwt.decode(user_token, options={"verify_signature": False})
    assert (claims["aud"], claims["iss"], claims["sub"]) == (AUDIENCE, provider.issuer, "fractal-user")
    assert jwt.get_unverified_header(user_token)["typ"] == "at+jwt"

    assert public.get("/regions", headers=bearer(user_token)).status_code == 200
    assert public.get("/regions", headers=bearer(operator_token)).status_code == 200
    assert admin.get("/admin/images", headers=bearer(operator_token)).status_code == 200
    refused = admin.get("/admin/images", headers=bearer(user_token))
    assert refused.status_code == 403 and refused.json["error"] == "FORBIDDEN", refused.json

    # The same provider's token for an app that expects another audience (or issuer) is refused.
    elsewhere = oidc_app("public", jwt_audience="https://other.example").test_client()
    wrong_audience = elsewhere.get("/regions", headers=bearer(user_token))
    assert wrong_audience.status_code == 401 and wrong_audience.json["error"] == "UNAUTHORIZED"


def test_rotation_costs_no_401_and_a_removed_key_stops_being_trusted_within_the_lifetime(
    provider: Provider, oidc_app: Callable[..., APIFlask]
) -> None:
    lifetime_s = 2.0
    k1, k2 = signing_key("k1"), signing_key("k2")
    provider.start([k1])
    client = oidc_app("public", jwks_lifetime_s=lifetime_s, jwks_refresh_cooldown_s=0.5).test_client()
    k1_token = provider.token(USER)
    assert kid_of(k1_token) == "k1"
    assert client.get("/regions", headers=bearer(k1_token)).status_code == 200

    # Rotation, step 1: k2 published beside k1 and signing. The very first k2 token is accepted (no 401 window).
    provider.start([k2, k1])
    time.sleep(0.5)  # the refetch cooldown after the app's last fetch (the restart alone takes about as long)
    k2_token = provider.token(USER)
    assert kid_of(k2_token) == "k2"
    first = client.get("/regions", headers=bearer(k2_token))
    assert first.status_code == 200, first.json
    assert provider.jwks_requests() == 1  # that request fetched the new set once
    assert client.get("/regions", headers=bearer(k1_token)).status_code == 200  # k1 still published

    # Step 2: k1 removed. Tokens signed with it (verified and cached moments ago) are refused within the lifetime.
    provider.start([k2])
    removed_at = time.monotonic()
    answers: list[int] = []
    while time.monotonic() - removed_at < lifetime_s + 3:
        answer = client.get("/regions", headers=bearer(k1_token))
        answers.append(answer.status_code)
        if answer.status_code == 401:
            assert answer.json["error"] == "UNAUTHORIZED" and set(answer.json) == {"error", "message"}
            break
        time.sleep(0.1)
    refused_after = time.monotonic() - removed_at
    assert answers[-1] == 401, f"a removed key is still trusted {refused_after:.1f} s later: {answers}"
    assert set(answers) <= {200, 401}, answers
    assert refused_after <= lifetime_s + 1.0, refused_after
    # k2 tokens, the old one and a fresh one, are unaffected.
    assert client.get("/regions", headers=bearer(k2_token)).status_code == 200
    assert client.get("/regions", headers=bearer(provider.token(USER))).status_code == 200


def test_an_unknown_kid_after_a_fresh_fetch_is_a_plain_401(
    provider: Provider, oidc_app: Callable[..., APIFlask]
) -> None:
    provider.start([signing_key("k1")])
    client = oidc_app("public", jwks_refresh_cooldown_s=30).test_client()
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    claims = {"sub": "mallory", "aud": AUDIENCE, "iss": provider.issuer, "iat": now, "exp": now + 300}

    # The app's first request fetches the set; the kid is not in it: 401, one fetch, nothing else.
    forged = jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": "k-unknown"})
    answer = client.get("/regions", headers=bearer(forged))
    assert answer.status_code == 401, answer.json
    assert answer.json["error"] == "UNAUTHORIZED" and set(answer.json) == {"error", "message"}
    assert provider.jwks_requests() == 1

    # A flood of made-up kids right after that fetch costs no fetch at all; real tokens keep working.
    for n in range(20):
        made_up = jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": f"made-up-{n}"})
        assert client.get("/regions", headers=bearer(made_up)).status_code == 401
    # A forged token naming the provider's real kid fails on its signature.
    impostor = jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": "k1"})
    assert client.get("/regions", headers=bearer(impostor)).status_code == 401
    assert client.get("/regions", headers=bearer(provider.token(USER))).status_code == 200
    assert provider.jwks_requests() == 1


def test_a_slow_jwks_endpoint_is_waited_for_boundedly_and_once(
    provider: Provider, oidc_app: Callable[..., APIFlask]
) -> None:
    provider.start([signing_key("k1")], jwks_delay_ms=4000)
    app = oidc_app("public", jwks_timeout_s=0.5, jwks_refresh_cooldown_s=30)
    token = provider.token(USER)
    statuses: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        status = app.test_client().get("/regions", headers=bearer(token)).status_code
        with lock:
            statuses.append(status)

    # A fresh start, eight users at once, the issuer's JWKS endpoint answering after 4 s.
    started = time.monotonic()
    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    elapsed = time.monotonic() - started
    assert statuses == [401] * 8, statuses
    assert elapsed < 2.5, elapsed  # one bounded wait (0.5 s), not eight in turn, not the endpoint's 4 s
    assert provider.jwks_requests() == 1  # one fetch in flight; its failure remembered for the others


@pytest.mark.slow
def test_gunicorn_configured_by_environment_trusts_the_provider_through_a_rotation(
    provider: Provider, database_url: str, tmp_path: Path
) -> None:
    """The production path: FRACTAL_JWKS_URL / _AUDIENCE / _ISSUER / _JWKS_LIFETIME_S read from the environment by
    two gunicorn workers, each with its own key cache; no 401 for a rotation, none for k1 once removed."""
    k1, k2 = signing_key("k1"), signing_key("k2")
    provider.start([k1])
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FRACTAL_", "GUNICORN_"))}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        {
            "DATABASE_URL": database_url,
            "FRACTAL_ENV": "test",
            "FRACTAL_JWKS_URL": provider.jwks_uri,
            "FRACTAL_JWT_AUDIENCE": AUDIENCE,
            "FRACTAL_JWT_ISSUER": provider.issuer,
            "FRACTAL_JWKS_LIFETIME_S": "2",
            "FRACTAL_JWKS_REFRESH_COOLDOWN_S": "0.5",
            "GUNICORN_BIND": f"127.0.0.1:{port}",
            "GUNICORN_WORKERS": "2",
            "GUNICORN_THREADS": "2",
            "GUNICORN_GRACEFUL_TIMEOUT": "3",
        }
    )
    server = start_gunicorn("app:app", env, port=port, log_path=tmp_path / "gunicorn.log")

    def statuses(token: str, n: int = 8) -> list[int]:
        answers = []
        for _ in range(n):  # new connections: the requests spread over both workers
            request = urllib.request.Request(f"{server.url}/regions", headers=bearer(token))
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    answers.append(response.status)
            except urllib.error.HTTPError as error:
                answers.append(error.code)
        return answers

    try:
        wait_until_ready(server, timeout_s=60)
        k1_token = provider.token(USER)
        assert statuses(k1_token) == [200] * 8, server.log_text()[-3000:]

        provider.start([k2, k1])
        time.sleep(0.5)
        k2_token = provider.token(USER)
        assert kid_of(k2_token) == "k2"
        assert statuses(k2_token) == [200] * 8  # every worker learns k2 on its first k2 token

        provider.start([k2])
        time.sleep(2.5)  # past the lifetime of every worker's key set
        assert statuses(k1_token) == [401] * 8
        assert statuses(k2_token) == [200] * 8
    finally:
        server.stop()
