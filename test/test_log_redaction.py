"""Logs are JSON with a request id and the caller, and never carry tokens, host secrets or database passwords."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from apiflask import APIBlueprint, APIFlask
from flask import request

from fractal.auth.decorators import host_required, user_required
from fractal.blueprints import PUBLIC_BLUEPRINTS
from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.factory import create_app
from fractal.observability import REDACTED, redact_text
from fractal.web import settings
from test.factories import Factories

DB_PASSWORD = "db-pa55word-never-logged"
leaky = APIBlueprint("leaky", __name__)
log = structlog.get_logger("test.leaky")


@leaky.post("/leaky/user")
@user_required
def leaky_user_view() -> dict[str, Any]:
    # The careless things real code does: log the headers, the body, the settings' URL, then crash on them.
    log.info("incoming", headers=dict(request.headers), body=request.get_json(silent=True))
    log.info("connecting to %s" % settings().database_url)  # noqa: UP031 (free text on purpose)
    raise RuntimeError(f"boom with {request.headers['Authorization']} on {settings().database_url}")


@leaky.post("/leaky/host")
@host_required
def leaky_host_view() -> dict[str, Any]:
    log.info("host call", authorization=request.headers["Authorization"], payload=request.get_json())
    log.info("raw header line: Authorization: %s", request.headers["Authorization"])
    return {"ok": True}


@pytest.fixture
def leaky_app(settings: Settings, session_factory: SessionFactory) -> APIFlask:
    url = settings.database_url.replace("postgres@", f"postgres:{DB_PASSWORD}@")
    leaky_settings = Settings(**{**settings.model_dump(), "database_url": url})
    return create_app(blueprints=[*PUBLIC_BLUEPRINTS, leaky], settings=leaky_settings, session_factory=session_factory)


@pytest.fixture
def log_stream(leaky_app: APIFlask) -> Iterator[io.StringIO]:
    """What the app's JSON log handler (installed by create_app) writes, instead of stderr."""
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    stream = io.StringIO()
    previous = handler.setStream(stream)
    yield stream
    handler.setStream(previous)


def log_lines(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_a_full_request_never_leaks_credentials(
    leaky_app: APIFlask,
    factories: Factories,
    make_token: Callable[..., str],
    log_stream: io.StringIO,
) -> None:
    token = make_token("user-log-1")
    instance, host_secret = factories.instance()
    client = leaky_app.test_client()

    response = client.post(
        "/leaky/user",
        json={"password": "hunter2-body", "note": f"my token is {token}"},
        headers={"Authorization": f"Bearer {token}", "X-Request-ID": "req-redaction-1"},
    )
    assert response.status_code == 500
    assert response.json["error"] == "INTERNAL_ERROR"
    response = client.post(
        "/leaky/host",
        json={"instance_name": instance.instance_name, "host_secret": host_secret},
        headers={"Authorization": f"Bearer {host_secret}"},
    )
    assert response.status_code == 200
    response = client.get("/regions", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200

    err = log_stream.getvalue()
    for secret in (token, host_secret, DB_PASSWORD, "hunter2-body"):
        assert secret not in err
    assert REDACTED in err
    lines = log_lines(err)
    # The logs are still useful: the request id, who called, the crash and the access lines are all there.
    user_lines = [line for line in lines if line.get("request_id") == "req-redaction-1"]
    assert any(line["event"] == "unhandled_exception" and "RuntimeError" in line["exception"] for line in user_lines)
    assert any(line["event"] == "incoming" and line.get("user_id") == "user-log-1" for line in user_lines)
    access = [line for line in lines if line["event"] == "request"]
    assert [line["status"] for line in access] == [500, 200, 200]
    assert access[1]["instance_name"] == instance.instance_name
    assert all(line["request_id"] for line in access)


def test_redact_text_covers_the_shapes_secrets_take() -> None:
    assert "s3cr3t" not in redact_text("postgresql+psycopg2://fractal:s3cr3t@db:5432/fractal")
    assert "s3cr3t" not in redact_text("redis://:s3cr3t@redis:6379/0")
    assert "abc.def" not in redact_text("Authorization: Bearer abc.def")
    assert redact_text("eyJhbGciOi.eyJzdWIi.c2ln") == REDACTED
    assert redact_text("key fk_0123456789ab_" + "A-_b" * 11) == "key " + REDACTED  # an API key, even unprefixed
    assert redact_text("nothing to hide at http://db:5432/x") == "nothing to hide at http://db:5432/x"


def test_a_full_scenario_logged_at_debug_never_shows_a_secret(
    database_url: str,
    committed_factory: SessionFactory,
    make_app: Callable[..., APIFlask],
    make_token: Callable[..., str],
    keypair: Any,
    starttls_smtp_server: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every log line of a whole scenario (our structlog events, the access log, SQLAlchemy's statements with
    their parameters, every library at DEBUG) is free of tokens, host secrets and passwords."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.orm import sessionmaker

    from fractal.auth.dev_keys import mint_token
    from fractal.config import normalise_database_url
    from fractal.mail.backends import SmtpBackend
    from test.test_newsletter import links, token_of

    smtp_password = "s3cret-pw"  # the fixture server's; it is in the SMTP URL the apps are configured with
    assert smtp_password in starttls_smtp_server.url
    url_with_password = make_url(normalise_database_url(database_url)).set(password=DB_PASSWORD)
    db_url = url_with_password.render_as_string(hide_password=False)
    engine = create_engine(db_url)  # the server trusts loopback: the password is carried, never checked
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    overrides: dict[str, Any] = {
        "database_url": db_url,
        "smtp_url": starttls_smtp_server.url,
        "log_level": "DEBUG",
        "public_url": "https://fractal.example",
    }
    apps = {kind: make_app(kind, factory=factory, **overrides) for kind in ("public", "admin", "host")}
    backend = SmtpBackend(starttls_smtp_server.url, ssl_context=starttls_smtp_server.tls.client_context)
    for app in apps.values():
        app.extensions["fractal"].mail_backend = backend  # trusts the fixture's self-signed cert
    # After create_app (which quiets them): every library at DEBUG, SQL statements with their parameters too.
    noisy = ["werkzeug", "botocore", "urllib3", "boto3", "sqlalchemy.engine", "sqlalchemy.pool", "mail.log"]
    previous = {name: logging.getLogger(name).level for name in noisy}
    for name in noisy:
        logging.getLogger(name).setLevel(logging.DEBUG)
    public, admin, host = (apps[kind].test_client() for kind in ("public", "admin", "host"))
    user_token = make_token("scenario-user")
    admin_token = make_token("scenario-operator", admin=True)
    expired = mint_token(keypair.private_pem, user_id="scenario-user", ttl_s=-60)
    user = {"Authorization": f"Bearer {user_token}"}
    operator = {"Authorization": f"Bearer {admin_token}"}
    try:
        image = {"ami_id": "ami-1", "active": True, "instance_type": "t3", "mandelbox_capacity": 2}
        assert admin.put("/admin/images/us-east-1/abc123", json=image, headers=operator).status_code == 200
        registered = admin.post(
            "/admin/instances",
            json={
                "instance_name": "i-scenario",
                "region": "us-east-1",
                "client_commit_hash": "abc123",
                "mandelbox_capacity": 2,
            },
            headers=operator,
        )
        assert registered.status_code == 201
        secret = registered.get_json()["host_secret"]
        hosted = {"Authorization": f"Bearer {secret}"}
        handshake = {
            "instance_name": "i-scenario",
            "ip": "10.0.0.9",
            "client_commit_hash": "abc123",
            "mandelbox_capacity": 2,
        }
        assert host.post("/host/handshake", json=handshake, headers=hosted).status_code == 200
        assert host.post("/host/heartbeat", json={"instance_name": "i-scenario"}, headers=hosted).status_code == 200

        assigned = public.post(
            "/mandelbox/assign",
            json={"regions": ["us-east-1"], "client_commit_hash": "abc123", "session_id": "s-1"},
            headers={**user, "Idempotency-Key": "scenario-key-1"},
        )
        assert assigned.status_code == 201
        box = f"/mandelboxes/{assigned.get_json()['mandelbox_id']}"
        assert host.get(f"/host{box}", headers=hosted).status_code == 200  # the host checks the claim
        for status in ("CONNECTING", "RUNNING"):
            assert host.put(f"/host{box}", json={"status": status}, headers=hosted).status_code == 200
        assert public.delete(box.replace("/mandelboxes/", "/mandelbox/"), headers=user).status_code == 202
        beat = host.post("/host/heartbeat", json={"instance_name": "i-scenario"}, headers=hosted)
        assert beat.get_json()["stop_mandelboxes"]
        assert host.put(f"/host{box}", json={"status": "EXITED"}, headers=hosted).status_code == 200

        assert public.post("/newsletter/subscribe", json={"email": "reader@example.com"}).status_code == 202
        mailed = links(starttls_smtp_server.inbox.messages[-1])
        assert public.get(mailed["confirm"].removeprefix("https://fractal.example")).status_code == 200
        unsubscribe_token = token_of(mailed["unsubscribe"])
        assert public.post("/newsletter/unsubscribe", json={"token": unsubscribe_token}).status_code == 200
        sent = admin.post(
            "/admin/mail",
            json={"template": "welcome", "to": "ada@example.com", "args": {"name": "Ada"}},
            headers=operator,
        )
        assert sent.status_code == 202
        assert starttls_smtp_server.inbox.logins == ["mailer", "mailer"]  # the password was used, twice

        # Refused credentials are secrets too: a wrong host secret, an expired token, a token on the host API.
        forged = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
        refused = [
            host.post(
                "/host/heartbeat", json={"instance_name": "i-scenario"}, headers={"Authorization": f"Bearer {forged}"}
            ),
            public.get("/regions", headers={"Authorization": f"Bearer {expired}"}),
            host.post("/host/heartbeat", json={"instance_name": "i-scenario"}, headers=user),
        ]
        assert [response.status_code for response in refused] == [401, 401, 401]
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)
        engine.dispose()

    captured = capsys.readouterr()
    logged = captured.out + captured.err
    # The capture saw the scenario: access lines, our events, SQL with parameters, the mail being sent. (The assign,
    # the heartbeat and the delete run their one statement at the driver, below SQLAlchemy's logging: the SQL seen
    # here is the handshake's and the host's status reports'.)
    assert logged.count('"event": "request"') >= 15
    assert "host_secret_hash" in logged and "UPDATE mandelboxes" in logged and "mail_sent" in logged
    secrets = {
        "user token": user_token,
        "admin token": admin_token,
        "expired token": expired,
        "host secret": secret,
        "forged host secret": forged,
        "SMTP password": smtp_password,
        "database password": DB_PASSWORD,
        "newsletter confirm token": token_of(mailed["confirm"]),
        "newsletter unsubscribe token": unsubscribe_token,
    }
    leaked = [name for name, value in secrets.items() if value in logged]
    assert not leaked, leaked


def test_api_key_requests_log_the_key_id_never_the_key(
    make_app: Callable[..., APIFlask], admin_headers: dict[str, str]
) -> None:
    client = make_app("admin").test_client()  # installs its log handler; capture it as log_stream does
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    stream = io.StringIO()
    previous = handler.setStream(stream)
    try:
        created = client.post(
            "/admin/api-keys", json={"name": "logged", "scopes": ["admin:read"]}, headers=admin_headers
        )
        key, key_id = created.get_json()["key"], created.get_json()["id"]
        assert client.get("/admin/capacity", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert client.get("/admin/capacity", headers={"Authorization": f"Bearer {key}x"}).status_code == 401
    finally:
        handler.setStream(previous)
    err = stream.getvalue()
    assert key not in err and key.split("_", 2)[2] not in err
    access = [line for line in log_lines(err) if line["event"] == "request" and line.get("path") == "/admin/capacity"]
    assert [line["status"] for line in access] == [200, 401]
    assert access[0]["key_id"] == key_id
