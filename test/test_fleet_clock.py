"""Timeouts are judged on the database's clock: a scaler whose machine clock is minutes off decides the same.

The sweeps and a scaler pass run in a subprocess under libfaketime (Debian's ``faketime``), its clock ten minutes
ahead or behind, against rows whose times the database wrote; the decisions are those of an honest clock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from fractal.clock import database_now
from fractal.database import SessionFactory
from fractal.models import EndReason, Heartbeat, Image, Instance, InstanceStatus, Mandelbox, MandelboxStatus
from test.factories import Factories

ROOT = Path(__file__).resolve().parent.parent
FAKETIME = shutil.which("faketime")
pytestmark = pytest.mark.skipif(FAKETIME is None, reason="faketime is not installed (./commands test installs it)")

PASS = """
import json, sys
from fractal.cloud.memory import MemoryCloud
from fractal.config import load_settings
from fractal.database import create_db_engine, create_session_factory
from fractal.fleet.sweeps import run_sweeps
from fractal.scaling.reconcile import reconcile_fleet
from fractal.clock import utcnow

settings = load_settings()
factory = create_session_factory(create_db_engine(settings))
with factory() as session:
    swept = run_sweeps(session, settings=settings)
report = reconcile_fleet(factory, settings=settings, cloud=MemoryCloud())
print(json.dumps({
    "process_clock": utcnow().isoformat(),
    "lost": swept.lost_instances,
    "released": sorted(str(m) for m in swept.released_mandelboxes),
    "terminated": sorted(a.instance_name for a in report.actions if a.action == "terminate"),
    "drained": sorted(a.instance_name for a in report.actions if a.action == "drain"),
}))
"""


def seed(factory: SessionFactory) -> dict[str, str]:
    """Rows on both sides of every timeout, timed by the database's clock."""
    with factory() as session:
        now = database_now(session)
        f = Factories(session)
        ago = lambda seconds: now - timedelta(seconds=seconds)  # noqa: E731
        session.add(
            Image(
                region="us-east-1",
                client_commit_hash="abc123",
                ami_id="ami-1",
                active=True,
                instance_type="t3",
                mandelbox_capacity=4,
                target_free=0,
            )
        )
        heard, _ = f.instance(instance_name="heard", status_changed_at=ago(3600), live_mandelboxes=2, empty_since=None)
        silent, _ = f.instance(instance_name="silent", status_changed_at=ago(3600))
        session.add_all(
            [
                Heartbeat(instance_name=heard.instance_name, last_heartbeat_at=ago(30), metrics={}),
                Heartbeat(instance_name=silent.instance_name, last_heartbeat_at=ago(90), metrics={}),
            ]
        )
        # Booting hosts: one just launched, one past the boot timeout.
        f.instance(instance_name="booting", status=InstanceStatus.PRE_CONNECTION, created_at=ago(60), ip=None)
        f.instance(instance_name="stuck-boot", status=InstanceStatus.PRE_CONNECTION, created_at=ago(1000), ip=None)
        fresh, stale = uuid.uuid4(), uuid.uuid4()
        for box_id, changed in ((fresh, ago(30)), (stale, ago(120))):
            session.add(
                Mandelbox(
                    mandelbox_id=box_id,
                    instance_name=heard.instance_name,
                    user_id=f"u-{box_id.hex[:6]}",
                    status=MandelboxStatus.ALLOCATED,
                    created_at=changed,
                    status_changed_at=changed,
                )
            )
        session.commit()
    return {"fresh": str(fresh), "stale": str(stale)}


@pytest.mark.parametrize("skew", ["+10m", "-10m"])
def test_a_skewed_scaler_makes_the_honest_decisions(
    skew: str, committed_factory: SessionFactory, database_url: str
) -> None:
    boxes = seed(committed_factory)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRACTAL_")}
    env.update(
        DATABASE_URL=database_url,
        FRACTAL_ENV="test",
        FRACTAL_HOST_TIMEOUT_S="60",
        FRACTAL_CONNECT_TIMEOUT_S="90",
        FRACTAL_BOOT_TIMEOUT_S="900",
        FRACTAL_SCALE_DOWN_DELAY_S="300",
        FRACTAL_LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    assert FAKETIME is not None
    done = subprocess.run(
        [FAKETIME, "-f", skew, sys.executable, "-c", PASS],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    decided = json.loads(done.stdout.strip().splitlines()[-1])
    with committed_factory() as session:
        skewed_by = abs(database_now(session) - _parse(decided["process_clock"]))
    assert skewed_by > timedelta(minutes=9), "the subprocess clock was not skewed"
    assert decided["lost"] == ["silent"]
    assert decided["released"] == [boxes["stale"]]
    # LOST and never-booted hosts are retired; the one that just launched is left to boot.
    assert set(decided["terminated"]) == {"silent", "stuck-boot"}
    with committed_factory() as session:
        statuses = {name: status for name, status in session.execute(select(Instance.instance_name, Instance.status))}
        box_status = {
            box: reason for box, reason in session.execute(select(Mandelbox.mandelbox_id, Mandelbox.end_reason))
        }
    assert statuses["heard"] is InstanceStatus.ACTIVE and statuses["booting"] is InstanceStatus.PRE_CONNECTION
    assert box_status[uuid.UUID(boxes["stale"])] is EndReason.CLAIM_TIMEOUT
    assert box_status[uuid.UUID(boxes["fresh"])] is None


def _parse(value: str) -> object:
    from datetime import datetime

    return datetime.fromisoformat(value)
