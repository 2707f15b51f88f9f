"""The embedded default keeps working for as long as it runs: `./commands run` over many scaler passes.

Users arrive beyond the first hosts' capacity and get mandelboxes once new hosts are up; when they leave, idle
hosts are drained and terminated; a second image version rolls the fleet over. No pass may fail on the way.
This is the regression test for passes that failed from the second one on (naive SQLite times).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from test.devserver import DevServer, running_devserver
from test.waiting import wait_for

pytestmark = pytest.mark.slow

REGION = "us-east-1"
USERS = 10  # the demo image packs 4 per host, and the buffer is one host: 10 users need new hosts
IMAGE = {"ami_id": "ami-demo", "instance_type": "local.sim", "mandelbox_capacity": 4, "target_free": 4}


def alive(server: DevServer) -> Callable[[], None]:
    """For wait_for: fail at once, with the server's last output, if it has exited."""

    def check() -> None:
        assert server.process.poll() is None, server.output()[-3000:]

    return check


def instances(server: DevServer, **where: str) -> list[dict[str, Any]]:
    status, body = server.call("admin", "GET", "/admin/instances?region=" + REGION, server.admin_token)
    assert status == 200, body
    return [i for i in body["instances"] if all(i[k] == v for k, v in where.items())]


def metric(server: DevServer, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", server.metrics(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_the_fleet_grows_shrinks_and_rolls_over_with_no_failed_pass(tmp_path: Path) -> None:
    settings = {
        "FRACTAL_SCALER_INTERVAL_S": "0.5",
        "FRACTAL_HEARTBEAT_INTERVAL_S": "0.5",
        "FRACTAL_SCALE_DOWN_DELAY_S": "2",
        "FRACTAL_ASSIGN_RATE_LIMIT": "100000 per minute",
    }
    with running_devserver(tmp_path, **settings) as server:
        tokens = {f"user-{n}": server.user_token(f"user-{n}") for n in range(USERS)}
        assign = {"regions": [REGION], "client_commit_hash": "local_dev"}
        boxes: dict[str, dict[str, Any]] = {}

        def everyone_assigned() -> bool:
            for user, token in tokens.items():
                if user in boxes:
                    continue
                status, body = server.call("public", "POST", "/mandelbox/assign", token, assign)
                if status == 201:
                    boxes[user] = body
                else:  # no room yet: the scaler was nudged and is booting another host
                    assert status == 503 and body["error"] == "NO_INSTANCE_AVAILABLE", body
            return len(boxes) == USERS

        # 1. Growth: every user gets a mandelbox, on hosts the scaler launched for them.
        wait_for(
            everyone_assigned,
            timeout_s=90,
            interval_s=0.25,
            message="every user to get a mandelbox",
            still_alive=alive(server),
        )
        hosting = {box["instance_name"] for box in boxes.values()}
        assert len(hosting) >= 3
        active = instances(server, status="ACTIVE")
        assert all(i["live_mandelboxes"] <= i["mandelbox_capacity"] for i in active)
        assert sum(i["live_mandelboxes"] for i in active) == USERS

        # 2. Shrink: users leave; their hosts empty, and spare ones are drained and terminated.
        for user, box in boxes.items():
            status, _ = server.call("public", "DELETE", f"/mandelbox/{box['mandelbox_id']}", tokens[user])
            assert status == 202
        wait_for(
            lambda: len(instances(server, status="ACTIVE")) == 1 and len(instances(server, status="TERMINATED")) >= 2,
            timeout_s=60,
            interval_s=0.25,
            message="spare hosts to be terminated",
            still_alive=alive(server),
        )

        # 3. Roll-over: a new version becomes active and the old one inactive; the fleet follows.
        for commit, active_flag in (("demo-0002", True), ("demo-0001", False)):
            status, body = server.call(
                "admin", "PUT", f"/admin/images/{REGION}/{commit}", server.admin_token, {**IMAGE, "active": active_flag}
            )
            assert status == 200, body

        def rolled_over() -> bool:
            old = [i for i in instances(server) if i["client_commit_hash"] == "demo-0001"]
            new = instances(server, client_commit_hash="demo-0002", status="ACTIVE")
            return bool(new) and all(i["status"] == "TERMINATED" for i in old)

        wait_for(
            rolled_over,
            timeout_s=60,
            interval_s=0.25,
            message="the fleet to roll over to demo-0002",
            still_alive=alive(server),
        )
        status, body = server.call(
            "public", "POST", "/mandelbox/assign", tokens["user-0"], {**assign, "client_commit_hash": "demo-0002"}
        )
        assert status == 201 and body["instance_name"].startswith(f"{REGION}-demo-000"), body

        # Many passes, none failed: the scenario above takes about 20 on a quiet machine and fewer when the machine
        # is busy (each pass is slower), so the scaler is given the time to reach 20 before the failures are read.
        wait_for(
            lambda: metric(server, "fractal_reconcile_duration_seconds_count") >= 20,
            timeout_s=60,
            interval_s=0.25,
            message="20 scaler passes",
            still_alive=alive(server),
        )
        assert metric(server, "fractal_reconcile_failures_total") == 0
        assert time.time() - metric(server, "fractal_reconcile_last_success_timestamp_seconds") < 30
        assert "scaler.pass_failed" not in server.output()
