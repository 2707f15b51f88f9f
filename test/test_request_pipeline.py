"""The per-request pipeline every API shares: no Flask session, request ids, the access line, hook dispatch."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import flask
import pytest
import structlog
from apiflask import APIFlask
from prometheus_client.parser import text_string_to_metric_families

from fractal import observability
from fractal.observability import new_request_id


def access_lines(err: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "request"]


def test_no_session_cookie_is_read_or_set(make_app: Callable[..., APIFlask]) -> None:
    app = make_app("public")

    @app.get("/read-session")
    def read_session() -> Any:
        return {"keys": sorted(flask.session.keys())}

    @app.get("/write-session")
    def write_session() -> Any:
        flask.session["user"] = "someone"
        return {}

    client = app.test_client()
    client.set_cookie("session", "eyJ1c2VyIjoic29tZW9uZSJ9.forged.signature")
    read = client.get("/read-session")
    assert read.status_code == 200 and read.json == {"keys": []}  # the cookie is never parsed into a session
    assert "Set-Cookie" not in read.headers and "Cookie" not in read.headers.get("Vary", "")
    healthz = client.get("/healthz")
    assert "Set-Cookie" not in healthz.headers
    written = client.get("/write-session")  # a view that tried would fail loudly, not set a cookie
    assert written.status_code == 500 and written.json == {"error": "INTERNAL_ERROR", "message": "Internal error."}
    assert "Set-Cookie" not in written.headers


def test_generated_request_ids_are_uuid4_hex(public_client: Any) -> None:
    ids = [public_client.get("/healthz").headers["X-Request-ID"] for _ in range(3)]
    ids.append(public_client.get("/healthz", headers={"X-Request-ID": "not sane!"}).headers["X-Request-ID"])
    ids.append(public_client.get("/healthz", headers={"X-Request-ID": "short"}).headers["X-Request-ID"])
    assert len(set(ids)) == len(ids)
    for request_id in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
        parsed = uuid.UUID(hex=request_id)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert uuid.UUID(hex=new_request_id()).hex != uuid.UUID(hex=new_request_id()).hex


def test_every_answer_carries_its_request_id_once(
    make_app: Callable[..., APIFlask], user_headers: Callable[..., dict[str, str]]
) -> None:
    """The id is sent by the app's WSGI wrapper, on answers the views, error handlers and werkzeug produce alike."""
    app = make_app("public")

    @app.get("/boom-id")
    def boom() -> Any:
        raise RuntimeError("unexpected")

    client = app.test_client()
    answers = {
        200: client.get("/healthz", headers={"X-Request-ID": "req-ok-000001"}),
        404: client.get("/no-such-path", headers={"X-Request-ID": "req-404-00001"}),
        405: client.post("/healthz", headers={"X-Request-ID": "req-405-00001"}),
        413: client.post(
            "/mandelbox/assign",
            data=b"x" * (2 * 1024 * 1024),
            headers={**user_headers(), "X-Request-ID": "req-413-00001", "Content-Type": "application/json"},
        ),
        500: client.get("/boom-id", headers={"X-Request-ID": "req-500-00001"}),
    }
    for status, answer in answers.items():
        assert answer.status_code == status, answer.get_data(as_text=True)
        assert answer.headers.getlist("X-Request-ID") == [answer.request.headers["X-Request-ID"]]


def test_access_line_fields_and_no_context_leak_between_requests(
    make_app: Callable[..., APIFlask], capsys: pytest.CaptureFixture[str]
) -> None:
    app = make_app("public")

    @app.get("/binds-a-user")
    def binds_a_user() -> Any:
        structlog.contextvars.bind_contextvars(user_id="user-1")
        return {}

    @app.get("/plain")
    def plain() -> Any:
        return {}

    client = app.test_client()
    capsys.readouterr()
    client.get("/binds-a-user", headers={"X-Request-ID": "req-first-0001"})
    client.get("/plain", headers={"X-Request-ID": "req-second-002"})
    client.get("/healthz", headers={"X-Request-ID": "req-quiet-0003"})
    first, second = access_lines(capsys.readouterr().err)  # /healthz writes no access line
    assert first["request_id"] == "req-first-0001" and first["user_id"] == "user-1"
    assert {key: second[key] for key in ("request_id", "path", "method", "status")} == {
        "request_id": "req-second-002",
        "path": "/plain",
        "method": "GET",
        "status": 200,
    }
    assert isinstance(second["duration_ms"], float | int) and second["duration_ms"] >= 0
    assert "user_id" not in second  # the first request's context ended with it
    assert structlog.contextvars.get_contextvars() == {}


def test_the_request_context_is_structlogs_own(make_app: Callable[..., APIFlask]) -> None:
    """The pipeline sets structlog's own variables: a view reads them with get_contextvars, rebinding one through
    bind_contextvars replaces it, and the teardown unbinds every key, those bound by the view included."""
    app = make_app("public")
    seen: list[dict[str, Any]] = []

    @app.get("/context")
    def context() -> Any:
        seen.append(structlog.contextvars.get_contextvars())
        structlog.contextvars.bind_contextvars(path="/rebound", user_id="user-2")
        seen.append(structlog.contextvars.get_contextvars())
        return {}

    client = app.test_client()
    assert client.get("/context", headers={"X-Request-ID": "req-context-01"}).status_code == 200
    assert seen == [
        {"request_id": "req-context-01", "path": "/context", "method": "GET"},
        {"request_id": "req-context-01", "path": "/rebound", "method": "GET", "user_id": "user-2"},
    ]
    assert structlog.contextvars.get_contextvars() == {}
    structlog.contextvars.bind_contextvars(outside="a request")
    observability.clear_log_context()
    assert structlog.contextvars.get_contextvars() == {}


def test_ensure_sync_is_remembered_for_plain_functions_only(make_app: Callable[..., APIFlask]) -> None:
    app = make_app("public")

    def plain() -> None:
        return None

    async def coroutine() -> None:
        return None

    assert app.ensure_sync(plain) is plain and app.ensure_sync(plain) is plain
    for _ in range(2):  # asked twice: the second answer is the same conversion, never the coroutine function
        try:
            converted = app.ensure_sync(coroutine)
        except RuntimeError as error:  # Flask's async support needs asgiref, which this project does not install
            assert "async" in str(error)
        else:
            assert converted is not coroutine


def test_a_view_apiflask_wrapped_is_called_without_its_wrapper(make_app: Callable[..., APIFlask]) -> None:
    """APIFlask's wrapper only asks ensure_sync again and calls the view: ensure_sync answers that call at once."""
    app = make_app("public")
    registered = app.view_functions["health.healthz"]
    view = registered.__wrapped__
    assert registered is not view and getattr(registered, "_sync_ensured", False)
    assert app.ensure_sync(registered) is view and app.ensure_sync(registered) is view
    calls: list[dict[str, Any]] = []

    @app.get("/wrapped/<name>")
    @app.doc(summary="a view APIFlask wraps")
    def wrapped(name: str) -> Any:
        calls.append({"name": name, "app": flask.current_app._get_current_object()})
        return {"name": name}

    assert app.ensure_sync(app.view_functions["wrapped"]) is wrapped.__wrapped__  # type: ignore[attr-defined]
    answer = app.test_client().get("/wrapped/abc")
    assert answer.status_code == 200 and answer.json == {"name": "abc"}
    assert calls == [{"name": "abc", "app": app}]


class Unanswerable(BaseException):
    """Not an Exception: no error handler answers it, so it ends the request in the teardown hook."""


def test_an_unanswered_exception_is_counted_once_as_a_500(make_app: Callable[..., APIFlask]) -> None:
    app = make_app("admin")

    @app.get("/unanswerable")
    def unanswerable() -> Any:
        raise Unanswerable()

    client = app.test_client()
    with pytest.raises(Unanswerable):
        client.get("/unanswerable")
    body = client.get("/metrics").get_data(as_text=True)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    rule = (("method", "GET"), ("status", "500"), ("url_rule", "/unanswerable"))
    assert samples[("flask_http_request_exceptions_total", (("method", "GET"), ("status", "500")))] == 1
    assert samples[("flask_http_request_duration_seconds_count", rule)] == 1
    assert samples[("flask_http_request_total", (("method", "GET"), ("status", "500")))] == 1
    assert structlog.contextvars.get_contextvars() == {}


def _samples(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = client.get("/metrics").get_data(as_text=True)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def test_paths_the_guards_refuse_get_a_request_id_metrics_and_an_access_line(
    make_app: Callable[..., APIFlask], capsys: pytest.CaptureFixture[str]
) -> None:
    """The path guards run in the pipeline's before hook, after the request has its id and is counted."""
    app = make_app("admin")

    @app.get("/things/<name>")
    def thing(name: str) -> Any:
        return {"name": name}

    client = app.test_client()
    capsys.readouterr()
    # A non-canonical path (werkzeug would redirect), a NUL in a path part, and the same rule served normally.
    redirected = client.get("/things/a/", headers={"X-Request-ID": "req-redirect-01"})
    nul = client.get("/things/a%00b", headers={"X-Request-ID": "req-nul-000001"})
    served = client.get("/things/ab")
    for answer, request_id in ((redirected, "req-redirect-01"), (nul, "req-nul-000001")):
        assert answer.status_code == 404 and answer.json["error"] == "NOT_FOUND", answer.get_data(as_text=True)
        assert answer.headers["X-Request-ID"] == request_id
    assert served.status_code == 200 and served.json == {"name": "ab"}
    lines = access_lines(capsys.readouterr().err)
    assert [(line["request_id"], line["status"]) for line in lines[:2]] == [
        ("req-redirect-01", 404),
        ("req-nul-000001", 404),
    ]
    samples = _samples(client)
    # The NUL path matched the rule (its part then refused); the redirect matched none.
    assert (
        samples[
            (
                "flask_http_request_duration_seconds_count",
                (("method", "GET"), ("status", "404"), ("url_rule", "/things/<name>")),
            )
        ]
        == 1
    )
    assert (
        samples[
            (
                "flask_http_request_duration_seconds_count",
                (("method", "GET"), ("status", "200"), ("url_rule", "/things/<name>")),
            )
        ]
        == 1
    )
    assert (
        samples[
            ("flask_http_request_duration_seconds_count", (("method", "GET"), ("status", "404"), ("url_rule", "None")))
        ]
        == 1
    )
