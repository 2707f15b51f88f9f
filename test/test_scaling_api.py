"""The scaling admin API, a whole version roll-out, and the scaler loop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fractal.assignment.service import assign_mandelbox
from fractal.cloud.memory import MemoryCloud
from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.fleet.mandelboxes import move_mandelboxes
from fractal.models import EndReason, Image, Instance, InstanceStatus, Mandelbox, MandelboxStatus
from fractal.nudge import LocalNudge
from fractal.scaling.runner import start_scaler_thread
from test.conftest import ROOT
from test.factories import Factories

S = InstanceStatus


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"target_free_mandelboxes": 4, "host_timeout_s": 3600}


@pytest.fixture
def cloud() -> MemoryCloud:
    return MemoryCloud()


@pytest.fixture
def admin(make_app: Callable[..., Any], cloud: MemoryCloud) -> Any:
    app = make_app("admin")
    app.extensions["fractal"].cloud = cloud
    return app.test_client()


def put_image(admin: Any, headers: dict[str, str], commit: str, *, active: bool, capacity: int = 2) -> None:
    body = {"ami_id": f"ami-{commit}", "active": active, "instance_type": "g4dn.xlarge", "mandelbox_capacity": capacity}
    answer = admin.put(f"/admin/images/us-east-1/{commit}", json=body, headers=headers)
    assert answer.status_code == 200, answer.get_json()


def test_reconcile_and_capacity_need_the_admin_scope(admin: Any, user_headers: Callable[..., dict[str, str]]) -> None:
    assert admin.post("/admin/scaling/reconcile").status_code == 401
    assert admin.get("/admin/capacity", headers=user_headers("someone")).status_code == 403
    answer = admin.get("/admin/capacity", headers=user_headers("someone"))
    assert answer.get_json()["error"] == "FORBIDDEN"


def test_reconcile_returns_its_actions_and_capacity_shows_the_buffer(
    admin: Any, admin_headers: dict[str, str], factories: Factories, cloud: MemoryCloud
) -> None:
    put_image(admin, admin_headers, "v1", active=True, capacity=2)
    factories.instance(client_commit_hash="v1", mandelbox_capacity=2, live_mandelboxes=1)
    answer = admin.post("/admin/scaling/reconcile", headers=admin_headers)
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["ran"] is True and body["errors"] == []
    launched = [a for a in body["actions"] if a["action"] == "launch"]
    assert len(launched) == 2 and len(cloud.launches) == 2  # 1 free, target 4 → ceil(3 / 2)

    capacity = admin.get("/admin/capacity", headers=admin_headers).get_json()["capacity"]
    assert capacity == [
        {
            "region": "us-east-1",
            "client_commit_hash": "v1",
            "active": True,
            "instances": {"PRE_CONNECTION": 2, "ACTIVE": 1, "DRAINING": 0, "TERMINATING": 0, "LOST": 0},
            "capacity": 6,
            "used": 1,
            "free": 5,
            "target_free": 4,
            "live_mandelboxes": 1,
            "target_reason": "static",
            "target_detail": {"target_free": 4},
        }
    ]


def test_version_roll_out_builds_the_new_buffer_and_drains_the_old_fleet_without_cutting_anyone_off(
    admin: Any, admin_headers: dict[str, str], db: Session, factories: Factories, cloud: MemoryCloud
) -> None:
    put_image(admin, admin_headers, "v1", active=True)
    old = [factories.instance(client_commit_hash="v1", mandelbox_capacity=2)[0].instance_name for _ in range(3)]
    boxes = [
        assign_mandelbox(db, user_id=f"user-{n}", regions=["us-east-1"], client_commit_hash="v1").assignment
        for n in range(3)
    ]
    assert {b.instance_name for b in boxes} == set(old[:2])  # bin packing: two hosts busy, one empty

    put_image(admin, admin_headers, "v2", active=True)
    put_image(admin, admin_headers, "v1", active=False)
    body = admin.post("/admin/scaling/reconcile", headers=admin_headers).get_json()
    assert [a["client_commit_hash"] for a in body["actions"] if a["action"] == "launch"] == ["v2", "v2"]
    db.expire_all()
    fleet = {i.instance_name: i.status for i in db.scalars(select(Instance))}
    assert fleet[old[2]] is S.TERMINATED  # the empty old host went at once
    assert fleet[old[0]] is S.DRAINING and fleet[old[1]] is S.DRAINING  # users still on them
    assert all(db.get(Mandelbox, b.mandelbox_id).status is MandelboxStatus.ALLOCATED for b in boxes)  # type: ignore[union-attr]

    # Users leave one by one; each host goes once its last user left, never before.
    for box in boxes:
        move_mandelboxes(
            db,
            where=Mandelbox.mandelbox_id == box.mandelbox_id,
            to=MandelboxStatus.EXITED,
            reason=EndReason.HOST_EXITED,
            actor="test",
        )
        db.commit()
        admin.post("/admin/scaling/reconcile", headers=admin_headers)
        db.expire_all()
        for name in old[:2]:
            live = db.get(Instance, name).live_mandelboxes  # type: ignore[union-attr]
            assert db.get(Instance, name).status is (S.DRAINING if live else S.TERMINATED)  # type: ignore[union-attr]
    reasons = {db.get(Mandelbox, b.mandelbox_id).end_reason for b in boxes}  # type: ignore[union-attr]
    assert reasons == {EndReason.HOST_EXITED}  # nobody was cut off by the roll-out
    capacity = {
        row["client_commit_hash"]: row
        for row in admin.get("/admin/capacity", headers=admin_headers).get_json()["capacity"]
    }
    assert capacity["v2"]["free"] == 4 and capacity["v1"]["instances"]["DRAINING"] == 0


@pytest.mark.slow
def test_the_loop_wakes_early_on_a_nudge_and_stops_promptly(
    committed_factory: SessionFactory, settings: Settings
) -> None:
    cloud = MemoryCloud()
    wakeup = LocalNudge()
    stop = start_scaler_thread(settings, committed_factory, cloud, wakeup=wakeup, interval_s=3600)
    try:
        time.sleep(0.5)  # the first pass runs at once and finds no image
        with committed_factory() as session:
            session.add(
                Image(
                    region="eu-west-1",
                    client_commit_hash="v9",
                    ami_id="ami-9",
                    active=True,
                    instance_type="t3.micro",
                    mandelbox_capacity=4,
                )
            )
            session.commit()
        assert cloud.launches == []
        wakeup.nudge()
        deadline = time.monotonic() + 10
        while not cloud.launches and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(cloud.launches) == 1 and cloud.launches[0].region == "eu-west-1"
    finally:
        started = time.monotonic()
        stop()
        assert time.monotonic() - started < 3


@pytest.mark.slow
def test_scaler_command_stops_cleanly_on_sigterm(committed_factory: SessionFactory, settings: Settings) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "FRACTAL_ENV": "test",
        "FRACTAL_CLOUD": "local",
        "FRACTAL_SCALER_INTERVAL_S": "0.2",
        "FRACTAL_LOG_JSON": "true",
    }
    env.pop("REDIS_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "admin_app", "scaler"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        output = ""
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            output += line
            if "scaler.pass" in line or "scaler.skipped" in line:
                break
        assert "scaler.pass" in output or "scaler.skipped" in output, output
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        rest = process.stdout.read()
        assert "scaler.stopped" in output + rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_drained_instances_of_a_region_never_count_toward_its_buffer(
    db: Session, admin: Any, admin_headers: dict[str, str], factories: Factories, cloud: MemoryCloud
) -> None:
    put_image(admin, admin_headers, "v1", active=True, capacity=4)
    instance, _ = factories.instance(client_commit_hash="v1", mandelbox_capacity=4)
    assign_mandelbox(db, user_id="u", regions=["us-east-1"], client_commit_hash="v1")
    db.execute(update(Instance).where(Instance.instance_name == instance.instance_name).values(status=S.DRAINING))
    db.commit()
    body = admin.post("/admin/scaling/reconcile", headers=admin_headers).get_json()
    assert sum(1 for a in body["actions"] if a["action"] == "launch") == 1
