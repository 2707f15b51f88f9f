"""`./commands run --public-port/--admin-port/--host-port`: the simulated hosts call the host API actually served."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test.devserver import DevServer
from test.servers import free_port, wait_for_port

pytestmark = pytest.mark.slow


def test_port_flags_alone_keep_simulated_hosts_on_the_served_host_api(tmp_path: Path) -> None:
    ports = {"public": free_port(), "admin": free_port(), "host": free_port()}
    # Nothing but the flags: no FRACTAL_HOST_API_URL, so the default (:8002) would be wrong here.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FRACTAL_") and key not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(FRACTAL_LOCAL_BOOT_DELAY_S="0.2", FRACTAL_LOG_JSON="true")
    command = [
        sys.executable,
        "-m",
        "fractal.devserver",
        f"--public-port={ports['public']}",
        f"--admin-port={ports['admin']}",
        f"--host-port={ports['host']}",
    ]
    out_path = tmp_path / "devserver.out"  # where DevServer.output() reads
    with out_path.open("wb") as output:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            for port in ports.values():
                wait_for_port(port, timeout_s=60)
            deadline = time.monotonic() + 30
            while not re.search(r"export ADMIN_TOKEN=(\S+)", out_path.read_text()):
                assert time.monotonic() < deadline and process.poll() is None, out_path.read_text()
                time.sleep(0.1)
            printed = out_path.read_text()
            token = re.search(r"export TOKEN=(\S+)", printed)
            admin_token = re.search(r"export ADMIN_TOKEN=(\S+)", printed)
            assert token and admin_token
            server = DevServer(tmp_path, process, ports, token[1], admin_token[1])
            assert f"simulated hosts call http://127.0.0.1:{ports['host']}" in printed

            # A simulated host can only become ACTIVE by shaking hands with the host API on ports["host"].
            deadline = time.monotonic() + 60
            while True:
                status, listing = server.call("admin", "GET", "/admin/instances?region=eu-west-1", server.admin_token)
                assert status == 200, listing
                active = [i for i in listing["instances"] if i["status"] == "ACTIVE" and i["last_heartbeat_at"]]
                if active:
                    break
                assert time.monotonic() < deadline, f"no simulated host reached the served host API: {listing}"
                time.sleep(0.5)
            # One process, one cache: an image the admin API enables is at once in the public API's regions,
            # even right after the public API cached them.
            assert server.call("public", "GET", "/regions", server.token)[1] == {"regions": ["eu-west-1", "us-east-1"]}
            image = {
                "ami_id": "ami-x",
                "active": True,
                "instance_type": "local.sim",
                "mandelbox_capacity": 1,
                "target_free": 0,
            }
            put = server.call("admin", "PUT", "/admin/images/ap-south-1/c1", server.admin_token, image)
            assert put[0] in (200, 201), put
            status, regions = server.call("public", "GET", "/regions", server.token)
            assert regions == {"regions": ["ap-south-1", "eu-west-1", "us-east-1"]}, regions

            assign = {"regions": ["eu-west-1"], "client_commit_hash": "local_dev"}
            status, body = server.call("public", "POST", "/mandelbox/assign", server.token, assign)
            assert status == 201, body
            assert body["region"] == "eu-west-1" and body["status"] == "ALLOCATED"
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert process.returncode == 0, out_path.read_text()[-3000:]
