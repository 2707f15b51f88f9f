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
    assert redact_text("nothing to hide at http://db:5432/x") == "nothing to hide at http://db:5432/x"
