"""The container's start sequence outside Docker: env.py waits for the database, migrates once, execs gunicorn."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fractal.config import normalise_database_url
from test.conftest import PG_SERVER_URL, alembic_config, create_database, drop_database
from test.processes import Stack, TcpProxy, free_port, http_get, start_sequence, stopping, wait_until_ready

pytestmark = pytest.mark.slow

# Trust auth ignores it, so it must only ever be seen by us: the logs are checked for it.
FAKE_PASSWORD = "pw-" + uuid.uuid4().hex


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A database with no tables at all: the start sequence must create them."""
    name = f"fractal_start_{uuid.uuid4().hex[:8]}"
    url = create_database(PG_SERVER_URL, name)
    yield url
    drop_database(PG_SERVER_URL, name)


def with_password(url: str, *, port: int | None = None) -> str:
    parsed = make_url(url).set(password=FAKE_PASSWORD)
    if port is not None:
        parsed = parsed.set(port=port)
    return parsed.render_as_string(hide_password=False)


def alembic_versions(url: str) -> list[str]:
    engine = create_engine(normalise_database_url(url))
    try:
        with engine.connect() as connection:
            return list(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
    finally:
        engine.dispose()


def json_lines(log: str) -> list[dict[str, object]]:
    lines = []
    for line in log.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_a_late_database_is_waited_for(empty_database: str, tmp_path: Path) -> None:
    upstream = make_url(PG_SERVER_URL)
    proxy_port = free_port()
    proxy = TcpProxy(proxy_port, (upstream.host or "127.0.0.1", upstream.port or 5432))
    started = start_sequence("public", with_password(empty_database, port=proxy_port), tmp_path)
    timer = threading.Timer(2.5, proxy.start)  # the database "comes up" 2.5 s after the container
    timer.start()
    try:
        with stopping(started):
            wait_until_ready(started, timeout_s=60)
            status, body = http_get(started.url + "/readyz")
            assert status == 200
            assert json.loads(body)["checks"]["database"] == "ok"
            log = started.log_text()
    finally:
        timer.cancel()
        proxy.stop()
    events = [str(line.get("event", "")) for line in json_lines(log)]
    assert any(event.startswith("database not reachable yet") for event in events), log
    assert any("reachable after" in event for event in events), log
    assert FAKE_PASSWORD not in log
    assert alembic_versions(empty_database)  # migrated through the proxy


def test_gives_up_with_a_non_zero_exit_when_the_database_never_comes(tmp_path: Path) -> None:
    url = f"postgresql://postgres:{FAKE_PASSWORD}@127.0.0.1:{free_port()}/nothing"
    started = start_sequence("admin", url, tmp_path, FRACTAL_DB_WAIT_TIMEOUT_S="2")
    began = time.monotonic()
    try:
        code = started.process.wait(timeout=30)
    finally:
        started.stop()
    assert code == 3
    assert time.monotonic() - began < 30
    log = started.log_text()
    assert "giving up" in log
    assert FAKE_PASSWORD not in log


def test_unknown_role_or_unsafe_settings_refuse_to_start(tmp_path: Path) -> None:
    bad_role = start_sequence("frontend", "sqlite:///:memory:", tmp_path)
    unsafe = start_sequence("public", "sqlite:///:memory:", tmp_path, FRACTAL_ENV="production")
    try:
        assert bad_role.process.wait(timeout=30) == 2
        assert unsafe.process.wait(timeout=30) == 2
    finally:
        bad_role.stop()
        unsafe.stop()
    assert "FRACTAL_APP must be one of" in bad_role.log_text()
    assert "DATABASE_URL" in unsafe.log_text()  # names the setting it refuses


def test_three_shells_starting_at_once_migrate_once_and_serve(three_shells: Stack) -> None:
    for shell in three_shells.shells:
        status, body = http_get(shell.url + "/readyz")
        assert status == 200, body
        assert http_get(shell.url + "/healthz")[0] == 200
    # Only the operators' API serves /metrics on its port (with the fleet gauges); the public and host APIs serve
    # their workers' counters on FRACTAL_METRICS_PORT, which is not their public port.
    status, body = http_get(three_shells.admin.url + "/metrics")
    assert status == 200 and b"fractal_fleet_metrics_up 1.0" in body
    for shell in (three_shells.public, three_shells.host):
        assert http_get(shell.url + "/metrics")[0] == 404
    status, body = http_get(f"http://127.0.0.1:{three_shells.public_metrics_port}/metrics")
    assert (
        status == 200
        and b'flask_http_request_duration_seconds_count{method="GET",status="200",url_rule="/readyz"}' in body
    )
    assert b"fractal_fleet_metrics_up" not in body  # no fleet query behind the public API's scrapes
    # Each shell serves its own API: only the admin shell knows /admin/instances.
    assert http_get(three_shells.public.url + "/admin/instances")[0] == 404
    assert http_get(three_shells.admin.url + "/admin/instances")[0] == 401
    logs = [shell.log_text() for shell in three_shells.shells]
    # Exactly one shell migrated, and it applied each revision once; the others found the schema at head.
    migrating = [log for log in logs if "Running upgrade" in log]
    assert len(migrating) == 1, "\n---\n".join(logs)
    revisions = list(ScriptDirectory.from_config(alembic_config()).walk_revisions())
    assert migrating[0].count("Running upgrade") == len(revisions)
    assert len(alembic_versions(three_shells.database_url)) == 1
    assert all(three_shells.password not in log for log in logs)
