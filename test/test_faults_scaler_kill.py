"""A scaler process SIGKILLed in the middle of its launches: the next pass converges.

The real command (`flask --app admin_app scaler`) runs against a fresh database and EC2 on a loopback moto server
(whose state outlives the killed process, as AWS would). It is killed while it is asking EC2 for hosts, after the
rows were committed with their ``pending:`` markers and before the answers were recorded. The next pass, in this
process, must leave exactly the wanted fleet: no double launch, no host running in EC2 without a live row, no live
row without a running host, and every half-launched row finished (TERMINATED).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import boto3
import pytest
from sqlalchemy import select, text

from fractal.clock import utcnow
from fractal.cloud.ec2 import Ec2Cloud
from fractal.config import Settings
from fractal.database import create_db_engine, create_session_factory
from fractal.models import Instance, InstanceStatus
from fractal.scaling.reconcile import LAUNCH_VISIBILITY_GRACE_S, PENDING_PREFIX, reconcile_fleet
from test.conftest import ROOT
from test.throwaway import throwaway_database

pytestmark = pytest.mark.slow

WANTED = 40  # capacity-1 instances the image's buffer asks for: one pass launches this many, one at a time
LEASE_TTL_S = 3
LIVE = (InstanceStatus.PRE_CONNECTION, InstanceStatus.ACTIVE, InstanceStatus.DRAINING)


@pytest.fixture
def fresh_database() -> Iterator[str]:
    with throwaway_database("fractal_kill") as url:
        yield url


def running_in_ec2(ec2: Any, commit: str) -> dict[str, str]:
    """instance id → fractal instance name of the hosts moto runs for this test's commit."""
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": "tag:fractal:client-commit-hash", "Values": [commit]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
    )
    return {
        i["InstanceId"]: next(t["Value"] for t in i["Tags"] if t["Key"] == "fractal:instance-name")
        for page in pages
        for r in page["Reservations"]
        for i in r["Instances"]
    }


def test_a_scaler_killed_mid_pass_is_repaired_by_the_next_pass(
    fresh_database: str, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", moto_endpoint)
    commit = f"kill-{uuid.uuid4().hex[:8]}"
    ec2 = boto3.client("ec2", region_name="us-east-1")
    engine = create_db_engine(Settings(**{**settings.model_dump(), "database_url": fresh_database}))
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO images (region, client_commit_hash, ami_id, active, instance_type, mandelbox_capacity,"
                " target_free) VALUES ('us-east-1', :commit, 'ami-12345678', true, 't3.micro', 1, :wanted)"
            ),
            {"commit": commit, "wanted": WANTED},
        )

    env = {
        **os.environ,
        "DATABASE_URL": fresh_database,
        "FRACTAL_ENV": "test",
        "FRACTAL_CLOUD": "aws",
        "AWS_ENDPOINT_URL_EC2": moto_endpoint,
        "FRACTAL_SCALER_INTERVAL_S": "3600",
        "FRACTAL_MAX_INSTANCES_PER_REGION": "1000",
        "FRACTAL_SCALER_LEASE_TTL_S": str(LEASE_TTL_S),
    }
    env.pop("REDIS_URL", None)
    scaler = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "admin_app", "scaler"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while len(running_in_ec2(ec2, commit)) < 3:
            assert scaler.poll() is None, "the scaler exited on its own"
            assert time.monotonic() < deadline, "the scaler never started launching"
            time.sleep(0.02)
        scaler.send_signal(signal.SIGKILL)
        scaler.wait(timeout=10)
    finally:
        if scaler.poll() is None:
            scaler.kill()
            scaler.wait(timeout=10)

    session_factory = create_session_factory(engine)
    with session_factory() as session:
        rows = session.execute(select(Instance.instance_name, Instance.cloud_provider_id, Instance.status)).all()
    # Killed mid-launch: every row still carries its marker, and EC2 started some hosts but not all.
    assert len(rows) == WANTED
    assert all((row.cloud_provider_id or "").startswith(PENDING_PREFIX) for row in rows)
    started_before_kill = running_in_ec2(ec2, commit)
    assert 3 <= len(started_before_kill) < WANTED, len(started_before_kill)

    app_settings = Settings(
        **{**settings.model_dump(), "database_url": fresh_database, "max_instances_per_region": 1000}
    )
    cloud = Ec2Cloud(app_settings)
    # The dead leader's lease still holds for a moment: the next pass skips, then takes over within one period.
    killed_at = time.monotonic()
    while not (first := reconcile_fleet(session_factory, settings=app_settings, cloud=cloud)).ran:
        assert first.skipped_reason == "another scaler holds the lease"
        assert time.monotonic() - killed_at < LEASE_TTL_S + 5, "the dead leader was not replaced within its lease"
        time.sleep(0.2)
    assert not first.errors, first.errors
    # Rows whose launch never reached EC2 stay TERMINATING until "not found" proves them gone (eventual
    # consistency grace); a pass after the grace finishes them without launching anything more.
    later = utcnow() + timedelta(seconds=LAUNCH_VISIBILITY_GRACE_S + 1)
    second = reconcile_fleet(session_factory, settings=app_settings, cloud=cloud, now=later)
    assert second.ran and not second.errors, second.errors
    assert second.count("launch") == 0

    with session_factory() as session:
        rows = session.execute(select(Instance.instance_name, Instance.cloud_provider_id, Instance.status)).all()
    live = {row.cloud_provider_id: row.instance_name for row in rows if row.status in LIVE}
    ended = [row for row in rows if row.status not in LIVE]
    running = running_in_ec2(ec2, commit)
    assert len(live) == WANTED  # the buffer is exactly met: no double launch
    assert running == live  # no orphan in EC2, no live row without its host
    assert not set(started_before_kill) & set(running)  # the dead pass's hosts were all terminated
    assert len(ended) == WANTED and {row.status for row in ended} == {InstanceStatus.TERMINATED}
    assert not any((row.cloud_provider_id or "").startswith(PENDING_PREFIX) for row in rows if row.status in LIVE)
    engine.dispose()
