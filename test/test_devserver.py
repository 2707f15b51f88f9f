"""`./commands run` end to end: a fresh directory, nothing configured, and within a minute an assign succeeds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from test.devserver import running_devserver

pytestmark = pytest.mark.slow


def test_embedded_defaults_serve_a_mandelbox_from_simulated_hosts(tmp_path: Path) -> None:
    with running_devserver(tmp_path) as server:
        assert (tmp_path / "instance" / "fractal.db").exists()  # the embedded SQLite default

        status, body = server.call("public", "GET", "/regions", server.token)
        assert (status, body) == (200, {"regions": ["eu-west-1", "us-east-1"]})

        deadline = time.monotonic() + 60
        assign = {"regions": ["us-east-1"], "client_commit_hash": "local_dev"}
        while True:
            status, body = server.call("public", "POST", "/mandelbox/assign", server.token, assign)
            if status == 201:
                break
            # The scaler is still launching the simulated hosts, which then shake hands over HTTP.
            assert status == 503 and body["error"] == "NO_INSTANCE_AVAILABLE", body
            assert time.monotonic() < deadline, "no simulated host became ACTIVE within a minute"
            time.sleep(0.5)
        assert body["status"] == "ALLOCATED" and body["region"] == "us-east-1"

        status, instances = server.call("admin", "GET", "/admin/instances", server.admin_token)
        assert status == 200
        hosting = next(i for i in instances["instances"] if i["instance_name"] == body["instance_name"])
        assert hosting["status"] == "ACTIVE" and hosting["last_heartbeat_at"] is not None
