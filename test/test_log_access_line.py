"""The access line written straight to the JSON handler is the line structlog's chain renders, and it goes through
structlog whenever another handler, filter or level could see the record differently."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from fractal import observability
from fractal.observability import _access_log, configure_logging, write_access_line

_TIMESTAMP = re.compile(r'"timestamp": "(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z)"')


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """Logging configured as the apps do, onto a buffer; the bound context cleared before and after."""
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging(level="INFO", json=True)
    structlog.contextvars.clear_contextvars()
    yield buffer
    structlog.contextvars.clear_contextvars()
    root.handlers[:], root.level = saved


@contextlib.contextmanager
def only_the_apps_handler() -> Iterator[None]:
    """pytest's logging plugin adds its capture handlers to the root for each test phase: without them, the root
    has the one handler the apps install, as in production."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [handler for handler in saved if isinstance(handler, observability.LineHandler)]
    yield
    root.handlers[:] = saved


def _lines(buffer: io.StringIO) -> list[str]:
    lines = buffer.getvalue().splitlines()
    buffer.seek(0)
    buffer.truncate()
    return lines


def _without_timestamp(line: str) -> str:
    assert _TIMESTAMP.search(line), line
    return _TIMESTAMP.sub('"timestamp": "T"', line)


def test_the_direct_line_is_the_line_structlog_renders(stderr: io.StringIO) -> None:
    with only_the_apps_handler():
        _direct_line_is_structlogs(stderr)


def _direct_line_is_structlogs(stderr: io.StringIO) -> None:
    writer = observability._access_line_writer
    assert writer is not None and writer.can_write_directly()  # not vacuous: the direct path is the one taken
    # What requests bind, and what redaction must still catch: a JWT in the path, a secret-named key, an object
    # JSON cannot serialise (the renderer's fallback), a context key the fields override.
    jwt_like = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJl"
    structlog.contextvars.bind_contextvars(
        request_id="0123456789abcdef0123456789abcdef",
        path=f"/mandelbox/{jwt_like}",
        method="POST",
        instance_name="host-1",
        host_secret="s3cret",
        mandelbox_id=uuid.UUID(int=5),
        status="overridden",
    )
    for fields in ({"status": 201, "duration_ms": 1.23}, {"status": 404, "duration_ms": None}):
        write_access_line(**fields)
        _access_log.info("request", **fields)
        direct, through_structlog = _lines(stderr)
        assert _without_timestamp(direct) == _without_timestamp(through_structlog)
        parsed = json.loads(direct)
        # The bound context comes first, in contextvars' own order; the chain's keys last.
        assert list(parsed)[-3:] == ["level", "logger", "timestamp"]
        assert set(parsed) == {
            "request_id",
            "path",
            "method",
            "instance_name",
            "host_secret",
            "mandelbox_id",
            "status",
            "event",
            "duration_ms",
            "level",
            "logger",
            "timestamp",
        }
        assert parsed["status"] == fields["status"] and parsed["host_secret"] == "[REDACTED]"
        assert jwt_like not in direct and parsed["logger"] == "fractal.access" and parsed["level"] == "info"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_another_handler_a_filter_or_the_level_send_the_line_through_structlog(stderr: io.StringIO) -> None:
    with only_the_apps_handler():
        _through_structlog_when_others_could_see_it(stderr)


def _through_structlog_when_others_could_see_it(stderr: io.StringIO) -> None:
    writer = observability._access_line_writer
    assert writer is not None
    structlog.contextvars.bind_contextvars(request_id="0123456789abcdef0123456789abcdef")
    extra = _Collect()
    root = logging.getLogger()
    root.addHandler(extra)
    try:
        assert not writer.can_write_directly()
        write_access_line(status=200, duration_ms=0.5)
    finally:
        root.removeHandler(extra)
    (line,) = _lines(stderr)
    assert json.loads(line)["status"] == 200
    (record,) = extra.records
    assert record.name == "fractal.access" and record.msg["event"] == "request"  # type: ignore[index]

    # A handler on the access logger itself, or on a logger between it and the root, also sees the record.
    for name in ("fractal.access", "fractal"):
        on_the_way = _Collect()
        logging.getLogger(name).addHandler(on_the_way)
        try:
            write_access_line(status=201, duration_ms=0.5)
        finally:
            logging.getLogger(name).removeHandler(on_the_way)
        assert len(on_the_way.records) == 1 and len(_lines(stderr)) == 1

    # Above INFO, no access line at all (as the stdlib logger drops it).
    root.setLevel(logging.WARNING)
    write_access_line(status=200, duration_ms=0.5)
    assert _lines(stderr) == []
    root.setLevel(logging.INFO)
    write_access_line(status=200, duration_ms=0.5)
    assert len(_lines(stderr)) == 1 and writer.can_write_directly()


def test_a_console_configuration_writes_through_structlog(stderr: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", stderr)  # the call phase's capture replaced it
    configure_logging(level="INFO", json=False)
    assert observability._access_line_writer is None
    write_access_line(status=200, duration_ms=0.5)
    (line,) = _lines(stderr)
    assert "request" in line and not line.startswith("{")


def test_the_line_of_a_request_is_written_directly(
    stderr: io.StringIO, make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stderr", stderr)  # the call phase's capture replaced it
    app = make_app("host")  # configures logging as every app does, on the patched stderr
    with only_the_apps_handler():
        _request_written_directly(app, stderr)


def _request_written_directly(app: Any, stderr: io.StringIO) -> None:
    writer = observability._access_line_writer
    assert writer is not None and writer.can_write_directly()
    calls: list[str] = []
    original = writer.handler.write_line

    def spy(line: str) -> None:
        calls.append(line)
        original(line)

    writer.handler.write_line = spy  # type: ignore[method-assign]
    answer = app.test_client().get("/host/nothing-here", headers={"X-Request-ID": "req-direct-0001"})
    assert answer.status_code == 404
    lines = [json.loads(line) for line in _lines(stderr) if line.startswith("{")]
    access = [line for line in lines if line.get("event") == "request"]
    assert len(calls) == 1 and len(access) == 1
    assert access[0]["request_id"] == "req-direct-0001" and access[0]["status"] == 404
