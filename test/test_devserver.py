"""`./commands run` end to end: a fresh directory, nothing configured, and within a minute an assign succeeds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from test.servers import free_port, wait_for_port

pytestmark = pytest.mark.slow


def call(method: str, url: str, token: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_embedded_defaults_serve_a_mandelbox_from_simulated_hosts(tmp_path: Path) -> None:
    ports = {"public": free_port(), "admin": free_port(), "host": free_port()}
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FRACTAL_") and key not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(
        FRACTAL_PUBLIC_PORT=str(ports["public"]),
        FRACTAL_ADMIN_PORT=str(ports["admin"]),
        FRACTAL_HOST_PORT=str(ports["host"]),
        FRACTAL_HOST_API_URL=f"http://127.0.0.1:{ports['host']}",
        FRACTAL_LOCAL_BOOT_DELAY_S="0.2",
        FRACTAL_LOG_JSON="true",
    )
    output = (tmp_path / "devserver.out").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "fractal.devserver"], cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT
    )
    try:
        for port in ports.values():
            wait_for_port(port, timeout_s=60)
        deadline = time.monotonic() + 30
        while True:  # the welcome text with the tokens follows the servers' start
            printed = (tmp_path / "devserver.out").read_text()
            token = re.search(r"export TOKEN=(\S+)", printed)
            admin_token = re.search(r"export ADMIN_TOKEN=(\S+)", printed)
            if token and admin_token:
                break
            assert time.monotonic() < deadline and process.poll() is None, printed
            time.sleep(0.1)
        public = f"http://127.0.0.1:{ports['public']}"
        assert (tmp_path / "instance" / "fractal.db").exists()  # the embedded SQLite default

        status, body = call("GET", f"{public}/regions", token.group(1))
        assert (status, body) == (200, {"regions": ["eu-west-1", "us-east-1"]})

        deadline = time.monotonic() + 60
        assign = {"regions": ["us-east-1"], "client_commit_hash": "local_dev"}
        while True:
            status, body = call("POST", f"{public}/mandelbox/assign", token.group(1), assign)
            if status == 201:
                break
            # The scaler is still launching the simulated hosts, which then shake hands over HTTP.
            assert status == 503 and body["error"] == "NO_INSTANCE_AVAILABLE", body
            assert time.monotonic() < deadline, "no simulated host became ACTIVE within a minute"
            time.sleep(0.5)
        assert body["status"] == "ALLOCATED" and body["region"] == "us-east-1"

        status, instances = call("GET", f"http://127.0.0.1:{ports['admin']}/admin/instances", admin_token.group(1))
        assert status == 200
        hosting = next(i for i in instances["instances"] if i["instance_name"] == body["instance_name"])
        assert hosting["status"] == "ACTIVE" and hosting["last_heartbeat_at"] is not None
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        output.close()
    assert process.returncode == 0, (tmp_path / "devserver.out").read_text()[-3000:]
