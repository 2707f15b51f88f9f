"""The `fractal` command and fractal.client against a live stack: `./commands run` in a fresh directory (the three
APIs, the scaler loop and simulated hosts speaking HTTP), driven through click's CliRunner.

Publish a version and wait until the scaler's hosts make its buffer warm, drain a host until it is terminated, read
and follow the audit log, the API-key lifecycle, and the exit codes (API error, usage, unreachable, timeout).
The client's 503 retries are checked against a scripted HTTP server (a real server cannot be made to answer 503 on
cue), everything else against the live stack.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from pytest_httpserver import HTTPServer
from werkzeug import Response

from fractal.client import AdminClient, ApiError, PublicClient, UnreachableError
from fractal.console import EXIT_API_ERROR, EXIT_TIMEOUT, EXIT_UNREACHABLE, EXIT_USAGE, main
from fractal.simulation.trace import read_csv
from test.devserver import DevServer, running_devserver
from test.servers import free_port

pytestmark = pytest.mark.slow
REGION = "cli-test-1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    directory: Path = tmp_path_factory.mktemp("console")
    with running_devserver(directory, FRACTAL_SCALER_INTERVAL_S="0.5", FRACTAL_SCALE_DOWN_DELAY_S="3600") as running:
        yield running


def run(server: DevServer, *args: str, credential: str | None = None, **env: str) -> Result:
    environment = {
        "FRACTAL_ADMIN_URL": server.url("admin"),
        "FRACTAL_ADMIN_TOKEN": server.admin_token if credential is None else "",
        "FRACTAL_API_KEY": credential or "",
        **env,
    }
    return CliRunner().invoke(main, list(args), env=environment, catch_exceptions=False)


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result.stdout


def json_lines(text: str) -> list[dict[str, Any]]:
    """`fractal events --json` prints one JSON document per line."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def one_line_error(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()  # progress lines (of --wait) may come before it
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], result.stderr
    assert "Traceback" not in result.output
    return errors[0]


def test_publish_wait_warm_then_drain_wait_then_deactivate(server: DevServer) -> None:
    commit = f"cli{uuid.uuid4().hex[:8]}"
    published = run(
        server, "images", "publish", REGION, commit, "--ami-id", "ami-cli", "--instance-type", "local.sim",
        "--capacity", "2", "--target-free", "2", "--wait", "--timeout", "60", "--interval", "0.2",
    )  # fmt: skip
    ok(published)
    assert f"{REGION}/{commit}: warm" in published.stderr
    assert "ACTIVE host(s)" in published.stderr  # progress lines were shown
    hosts = json.loads(ok(run(server, "instances", "list", "--region", REGION, "--json")))
    active = [host for host in hosts if host["client_commit_hash"] == commit and host["status"] == "ACTIVE"]
    assert active and sum(host["mandelbox_capacity"] - host["live_mandelboxes"] for host in active) >= 2

    table = ok(run(server, "capacity"))
    assert commit in table and "TARGET_FREE" in table.splitlines()[0] and "TARGET_REASON" in table.splitlines()[0]
    ours = [line.split() for line in table.splitlines() if commit in line]
    assert ours[0][-2:] == ["2", "static"]  # target_free 2, and why: the image's static target

    name = active[0]["instance_name"]
    drained = run(server, "instances", "drain", name, "--wait", "--timeout", "60", "--interval", "0.2", "--json")
    ok(drained)
    assert json.loads(drained.stdout)["status"] == "TERMINATED"
    assert f"{name}: DRAINING" in drained.stderr

    log = json_lines(ok(run(server, "events", "--limit", "200", "--json")))
    kinds = {event["kind"] for event in log if event["instance_name"] == name}
    assert {"instance.launched", "instance.activated", "instance.drained", "instance.terminated"} <= kinds

    deactivated = json.loads(ok(run(server, "images", "deactivate", REGION, commit, "--json")))
    assert deactivated["active"] is False and deactivated["ami_id"] == "ami-cli"


def test_wait_that_runs_out_exits_4(server: DevServer) -> None:
    commit = f"cli{uuid.uuid4().hex[:8]}"
    result = run(
        server, "images", "publish", REGION, commit, "--ami-id", "ami-cli", "--instance-type", "local.sim",
        "--capacity", "2", "--target-free", "6", "--wait", "--timeout", "0",
    )  # fmt: skip
    assert "timed out" in one_line_error(result, EXIT_TIMEOUT)
    ok(run(server, "images", "deactivate", REGION, commit))


def test_events_follow_prints_new_events(server: DevServer) -> None:
    name = f"cli-follow-{uuid.uuid4().hex[:6]}"

    def register_later() -> None:
        time.sleep(1.0)
        AdminClient(server.url("admin"), server.admin_token).register_instance(
            name, region=REGION, client_commit_hash="nothing-active", mandelbox_capacity=1
        )

    thread = threading.Thread(target=register_later)
    thread.start()
    try:
        result = run(server, "events", "--limit", "1", "--follow", "--interval", "0.2", "--timeout", "4")
    finally:
        thread.join(timeout=10)
    output = ok(result)
    assert output.splitlines()[0].startswith("ID")
    followed = [line for line in output.splitlines() if name in line]
    assert followed and "instance.registered" in followed[0]
    # No cleanup needed: the scaler terminates a host whose version has no active image.


def test_keys_lifecycle(server: DevServer) -> None:
    created = json.loads(
        ok(run(server, "keys", "create", "ci-deploy", "--scope", "images:write", "--scope", "admin:read", "--json"))
    )
    key, key_id = created["key"], created["id"]
    assert key.startswith(f"fk_{key_id}_") and created["scopes"] == ["admin:read", "images:write"]
    listing = ok(run(server, "keys", "list"))
    assert key_id in listing and key not in listing and "LAST_USED_AT" in listing.splitlines()[0]

    ok(run(server, "capacity", credential=key))  # admin:read
    refused = one_line_error(run(server, "reconcile", credential=key), EXIT_API_ERROR)
    assert "403 FORBIDDEN" in refused and "admin:write" in refused
    used = json.loads(ok(run(server, "keys", "list", "--json")))
    assert next(entry for entry in used if entry["id"] == key_id)["last_used_at"] is not None

    revoked = json.loads(ok(run(server, "keys", "revoke", key_id, "--json")))
    assert revoked["id"] == key_id and revoked["revoked_at"] is not None
    after = one_line_error(run(server, "capacity", credential=key), EXIT_API_ERROR)
    assert "401 UNAUTHORIZED" in after and "revoked" in after
    expiring = run(
        server, "keys", "create", "temp", "--scope", "admin:read", "--expires-at", "2099-01-01T00:00:00+00:00"
    )
    assert "key (shown once): fk_" in ok(expiring)
    listed = json.loads(ok(run(server, "keys", "list", "--json")))
    assert [entry["expires_at"] for entry in listed if entry["name"] == "temp"] == ["2099-01-01T00:00:00Z"]
    past = run(server, "keys", "create", "old", "--scope", "admin:read", "--expires-at", "2000-01-01T00:00:00+00:00")
    assert "400 VALIDATION_ERROR" in one_line_error(past, EXIT_API_ERROR)
    kinds = [event["kind"] for event in json_lines(ok(run(server, "events", "--json", "--limit", "30")))]
    assert {"api_key.created", "api_key.revoked", "api_key.refused"} <= set(kinds)


def test_api_errors_are_one_line_and_exit_1(server: DevServer) -> None:
    missing = one_line_error(run(server, "instances", "drain", "no-such-host"), EXIT_API_ERROR)
    assert "404 NOT_FOUND" in missing
    bad = run(
        server, "images", "publish", "Not A Region", "c1", "--ami-id", "a", "--instance-type", "t", "--capacity", "1"
    )
    assert "400 VALIDATION_ERROR" in one_line_error(bad, EXIT_API_ERROR)
    wrong = one_line_error(run(server, "capacity", credential="fk_000000000000_" + "x" * 43), EXIT_API_ERROR)
    assert "401 UNAUTHORIZED" in wrong


def test_unreachable_and_usage_exit_codes(server: DevServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    line = one_line_error(run(server, "--url", dead, "images", "list"), EXIT_UNREACHABLE)
    assert dead in line
    no_credential = CliRunner().invoke(main, ["capacity"], env={"FRACTAL_API_KEY": "", "FRACTAL_ADMIN_TOKEN": ""})
    assert no_credential.exit_code == EXIT_USAGE and "FRACTAL_API_KEY" in no_credential.output
    assert run(server, "keys", "create", "x", "--scope", "root").exit_code == EXIT_USAGE


def test_client_follows_pages_and_raises_typed_errors(server: DevServer) -> None:
    client = AdminClient(server.url("admin"), server.admin_token)
    made = {client.create_api_key(f"page-{n}", ["admin:read"]).api_key.id for n in range(3)}
    paged = [key.id for key in client.iter_api_keys(page_size=1)]
    assert made <= set(paged) and len(paged) == len(set(paged))
    events = client.events(limit=7)
    assert len(events) == 7 and [event.id for event in events] == sorted((event.id for event in events), reverse=True)
    assert events[0].created_at is not None and events[0].created_at.tzinfo is not None
    with pytest.raises(ApiError) as caught:
        client.drain("no-such-host")
    assert (caught.value.status, caught.value.code) == (404, "NOT_FOUND") and caught.value.message
    with pytest.raises(UnreachableError):
        AdminClient(f"http://127.0.0.1:{free_port()}", "x").capacity()


def test_events_export_through_the_api_is_the_audit_logs_sessions(server: DevServer, tmp_path: Path) -> None:
    """`fractal events export` reads GET /admin/events (kind and time filters, paged) into a trace: one session per
    assigned mandelbox, ended ones as long as they lived; the same rows as reading the database directly."""
    commit = f"exp{uuid.uuid4().hex[:8]}"
    ok(run(
        server, "images", "publish", REGION, commit, "--ami-id", "ami-cli", "--instance-type", "local.sim",
        "--capacity", "2", "--target-free", "2", "--wait", "--timeout", "60", "--interval", "0.2",
    ))  # fmt: skip
    since = datetime.now(UTC) - timedelta(seconds=5)
    users = [f"export-{uuid.uuid4().hex[:8]}-{n}" for n in range(2)]
    clients = [PublicClient(server.url("public"), server.user_token(user)) for user in users]
    ended, live = (client.assign([REGION], commit) for client in clients)
    time.sleep(1.2)  # the ended session lasts at least a second of audit-log time
    clients[0].delete_mandelbox(ended.mandelbox_id)
    deadline = time.monotonic() + 30
    while clients[0].mandelbox(ended.mandelbox_id).status != "EXITED":  # the simulated host stops it
        assert time.monotonic() < deadline, "the deleted mandelbox never EXITED"
        time.sleep(0.2)

    assert clients[1].mandelbox(live.mandelbox_id).status != "EXITED"  # still live: lasts until the export's end
    through_api, from_database = tmp_path / "api.csv", tmp_path / "db.csv"
    exported = ok(run(server, "events", "export", "-o", str(through_api), "--since", since.isoformat()))
    assert f"to {through_api}" in exported
    ours = [row for row in read_csv(through_api) if row.client_commit_hash == commit]
    assert [row.region for row in ours] == [REGION, REGION]
    lengths = sorted(row.session_s for row in ours)
    assert 1.0 <= lengths[0] < 30 and lengths[1] >= 1.0  # the ended one lived from its assign to its EXITED

    # The operator's last step: switch the image to a demand-aware buffer; capacity shows the new target and why.
    ok(run(
        server, "images", "publish", REGION, commit, "--ami-id", "ami-cli", "--instance-type", "local.sim",
        "--capacity", "2", "--buffer-policy", '{"kind": "demand", "floor": 3}',
    ))  # fmt: skip
    rows = json.loads(ok(run(server, "capacity", "--json")))
    switched = next(row for row in rows if row["client_commit_hash"] == commit)
    assert switched["target_reason"] in ("demand", "floor") and switched["target_free"] >= 3
    assert switched["target_detail"]["floor"] == 3 and switched["target_detail"]["arrivals"] >= 2

    database = f"sqlite:///{server.directory / 'instance' / 'fractal.db'}"
    until = datetime.now(UTC)
    ok(run(server, "events", "export", "-o", str(from_database), "--database-url", database,
           "--since", since.isoformat(), "--until", until.isoformat()))  # fmt: skip
    direct = [row for row in read_csv(from_database) if row.client_commit_hash == commit]
    assert [(row.arrival, row.region) for row in direct] == [(row.arrival, row.region) for row in ours]
    assert min(row.session_s for row in direct) == lengths[0]

    bad = run(server, "events", "export", "-o", str(tmp_path / "x.csv"), "--since", "2026-12-01T00:00:00")
    assert bad.exit_code == EXIT_USAGE and not (tmp_path / "x.csv").exists()  # no offset: refused by click


def _busy(retry_after: str = "1") -> Response:
    body = json.dumps({"error": "DATABASE_BUSY", "message": "busy"})
    return Response(body, status=503, headers={"Retry-After": retry_after}, content_type="application/json")


def test_client_retries_503_with_retry_after_within_bounds(httpserver: HTTPServer) -> None:
    answers: list[Any] = [
        _busy("2"),
        _busy("600"),
        Response(json.dumps({"capacity": []}), 200, content_type="application/json"),
    ]
    httpserver.expect_request("/admin/capacity").respond_with_handler(lambda _request: answers.pop(0))
    waits: list[float] = []
    client = AdminClient(httpserver.url_for(""), "t", sleep=waits.append, max_retry_wait_s=5)
    assert client.capacity() == []
    assert waits == [2.0, 5.0]  # the advised wait, capped

    httpserver.clear()
    httpserver.expect_request("/admin/capacity").respond_with_handler(lambda _request: _busy("1"))
    waits.clear()
    with pytest.raises(ApiError) as caught:
        AdminClient(httpserver.url_for(""), "t", sleep=waits.append, max_retries=2).capacity()
    assert (caught.value.status, caught.value.code, caught.value.retry_after_s) == (503, "DATABASE_BUSY", 1.0)
    assert waits == [1.0, 1.0]

    httpserver.clear()  # a 503 without Retry-After is not retried
    httpserver.expect_ordered_request("/admin/capacity").respond_with_json({"error": "X", "message": "m"}, status=503)
    waits.clear()
    with pytest.raises(ApiError):
        AdminClient(httpserver.url_for(""), "t", sleep=waits.append).capacity()
    assert waits == []
