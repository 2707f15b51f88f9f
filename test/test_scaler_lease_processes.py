"""Three scaler processes on a moto EC2 server, through PgBouncer in transaction-pooling mode: the leader is
SIGKILLed mid-pass, the next one SIGSTOPped mid-pass past its lease and continued after the third has taken over.

No double launch (EC2 runs exactly the target), no orphan (every EC2 host has its live row and every live row its
host), and nothing from the stale leader once it wakes: it neither launches nor terminates (EC2 is unchanged) nor
records (no row or event changes), and its pass fails on the fence.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import psycopg2
import pytest
from sqlalchemy.engine import make_url

from test.deployment import debian_binary, ec2_hosts, start_pgbouncer, stop_all, tag
from test.processes import StartedProcess, start_sequence
from test.throwaway import throwaway_database
from test.waiting import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(debian_binary("pgbouncer") is None, reason="needs Debian's pgbouncer"),
]

TARGET = 24  # capacity-1 hosts: one pass launches them one at a time, long enough to be caught mid-pass
LEASE_TTL_S = 4.0
INTERVAL_S = 0.5
# A leader stopped inside a transaction keeps its locks until the server ends that transaction.
IDLE_IN_TRANSACTION_MS = 4000


class Fleet:
    def __init__(self, database_url: str, ec2: Any, commit: str) -> None:
        self.connection = psycopg2.connect(make_url(database_url).set(drivername="postgresql").render_as_string(False))
        self.connection.autocommit = True
        self.ec2 = ec2
        self.commit = commit

    def sql(self, query: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self.connection.cursor() as cursor:
            cursor.execute(query, {"c": self.commit, **(params or {})})
            return cursor.fetchall() if cursor.description else []

    def leader(self) -> tuple[int, int] | None:
        """(pid, fencing token) of the live lease's holder."""
        rows = self.sql("SELECT holder, fencing_token FROM leases WHERE name = 'scaler' AND expires_at > now()")
        return (int(str(rows[0][0]).split(":")[-2]), int(rows[0][1])) if rows else None

    def pending(self) -> set[str]:
        """Rows a pass committed before asking the cloud, whose answers are not recorded (yet)."""
        rows = self.sql(
            "SELECT instance_name FROM instances WHERE client_commit_hash = %(c)s AND status = 'PRE_CONNECTION'"
            " AND cloud_provider_id LIKE 'pending:%%'"
        )
        return {str(row[0]) for row in rows}

    def rows(self) -> list[tuple[Any, ...]]:
        return self.sql(
            "SELECT instance_name, status, cloud_provider_id FROM instances WHERE client_commit_hash = %(c)s"
            " ORDER BY instance_name"
        )

    def live(self) -> dict[str, str]:
        """provider id → instance name of the live rows."""
        return {str(cloud_id): name for name, status, cloud_id in self.rows() if status in ("PRE_CONNECTION", "ACTIVE")}

    def running(self) -> dict[str, str | None]:
        return {iid: tag(i, "fractal:instance-name") for iid, i in ec2_hosts(self.ec2, self.commit).items()}

    def every_host(self) -> dict[str, str]:
        """Every EC2 host ever launched for the commit → its state."""
        states = ("pending", "running", "shutting-down", "terminated", "stopping", "stopped")
        return {iid: i["State"]["Name"] for iid, i in ec2_hosts(self.ec2, self.commit, states).items()}

    def converged(self) -> bool:
        live = self.live()
        return len(live) == TARGET and self.running() == live

    def settled(self) -> tuple[dict[str, str], list[tuple[Any, ...]], int] | None:
        """At the target, and nothing changed over a couple of passes: (EC2 hosts, rows, actions recorded)."""
        if not self.converged():
            return None
        before = self.every_host(), self.rows(), self.actions_recorded()
        time.sleep(2 * INTERVAL_S + 0.5)
        after = self.every_host(), self.rows(), self.actions_recorded()
        return after if after == before and self.converged() else None

    def actions_recorded(self) -> int:
        return int(
            self.sql(
                "SELECT count(*) FROM events WHERE kind IN ('instance.launched', 'instance.terminating',"
                " 'instance.terminated', 'scaler.error', 'scaler.decision')"
            )[0][0]
        )


@pytest.fixture
def three_scalers(moto_endpoint: str) -> Iterator[tuple[Fleet, list[StartedProcess]]]:
    commit = f"lease-{uuid.uuid4().hex[:8]}"
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_endpoint)
    with throwaway_database("fractal_lease_procs") as url, tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        directory.chmod(0o755)
        bouncer = start_pgbouncer(directory / "pgbouncer", pool_size=3)
        fleet = Fleet(url, ec2, commit)
        scalers: list[StartedProcess] = []
        try:
            fleet.sql(
                "INSERT INTO images (region, client_commit_hash, ami_id, active, instance_type, mandelbox_capacity,"
                " target_free) VALUES ('us-east-1', %(c)s, 'ami-12345678', true, 't3.micro', 1, %(t)s)",
                {"t": TARGET},
            )
            env = {
                "FRACTAL_ENV": "test",
                "FRACTAL_CLOUD": "aws",
                "FRACTAL_MIGRATE": "false",
                "AWS_ENDPOINT_URL_EC2": moto_endpoint,
                "FRACTAL_SCALER_INTERVAL_S": str(INTERVAL_S),
                "FRACTAL_SCALER_LEASE_TTL_S": str(LEASE_TTL_S),
                "FRACTAL_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS": str(IDLE_IN_TRANSACTION_MS),
                "FRACTAL_TARGET_FREE_MANDELBOXES": "0",
                "FRACTAL_MAX_INSTANCES_PER_REGION": "200",
            }
            for index in range(3):
                health = str(directory / f"scaler-{index}.health")
                pooled = bouncer.url(make_url(url).database or "")
                scalers.append(start_sequence("scaler", pooled, directory, FRACTAL_SCALER_HEALTH_FILE=health, **env))
            yield fleet, scalers
        finally:
            stop_all(scalers)
            fleet.connection.close()
            bouncer.stop()


def test_a_killed_leader_and_a_paused_one_leave_no_double_launch_no_orphan_and_no_stale_action(
    three_scalers: tuple[Fleet, list[StartedProcess]],
) -> None:
    fleet, scalers = three_scalers
    by_pid = {s.process.pid: s for s in scalers}

    # 1. SIGKILL the leader in the middle of its launches (some hosts started, their answers unrecorded).
    first = wait_for(
        lambda: (held := fleet.leader()) and fleet.pending() and len(fleet.running()) >= 2 and held,
        timeout_s=60,
        interval_s=0.005,
        message="a leader mid-launch",
    )
    os.kill(first[0], signal.SIGKILL)
    by_pid[first[0]].process.wait(timeout=10)
    left_by_the_dead = fleet.pending()

    # 2. The next leader takes over within one lease period; SIGSTOP it in the middle of its own launches (rows of
    # its own pending, not the dead one's, which it first takes for unconfirmed launches).
    second = wait_for(
        lambda: (
            (held := fleet.leader())
            and held[0] != first[0]
            and held[1] > first[1]
            and fleet.pending() - left_by_the_dead
            and held
        ),
        timeout_s=LEASE_TTL_S + 15,
        interval_s=0.005,
        message="a second leader mid-launch",
    )
    # Let it get a few launches into its loop (right after its rows are committed it is renewing the lease, inside
    # a transaction), then stop it between two of them.
    baseline = len(fleet.running())
    wait_for(
        lambda: len(fleet.running()) >= baseline + 2 and fleet.pending() - left_by_the_dead,
        timeout_s=20,
        interval_s=0.005,
        message="the second leader's launches under way",
    )
    assert fleet.leader() == second
    os.kill(second[0], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # 3. The third takes the lease once the paused one's has expired, and brings the fleet to its target.
        third = wait_for(
            lambda: (held := fleet.leader()) and held[0] not in (first[0], second[0]) and held,
            timeout_s=LEASE_TTL_S + IDLE_IN_TRANSACTION_MS / 1000 + 15,
            interval_s=0.05,
            message="the third leader",
        )
        assert third[1] > second[1]  # a new token: the paused leader's is fenced off
        hosts_before, rows_before, recorded_before = wait_for(
            fleet.settled, timeout_s=60, interval_s=0.2, message="the fleet settled at its target"
        )
        assert time.monotonic() - stopped_at > LEASE_TTL_S  # paused well past its lease
        log_before = len(by_pid[second[0]].log_text())
    finally:
        os.kill(second[0], signal.SIGCONT)

    # 4. Woken, the stale leader's pass fails on the fence: nothing launched, terminated or recorded after it.
    stale = by_pid[second[0]]
    woke = wait_for(
        lambda: [line for line in stale.log_text()[log_before:].splitlines() if "scaler.pass_failed" in line],
        timeout_s=20,
        message="the stale leader's pass failing",
    )
    # The fence (LeaseLost), or, when the pause caught it inside a transaction, the server having ended that
    # transaction (idle_in_transaction_session_timeout) so that the successor could take over.
    assert any("LeaseLost" in line or "the database is unreachable" in line for line in woke), woke
    time.sleep(2 * INTERVAL_S + 1)  # passes of every survivor, the woken one included, on the converged fleet
    assert stale.process.poll() is None  # it lives on as an ordinary replica
    assert fleet.every_host() == hosts_before  # no launch, no terminate since the wake-up
    assert fleet.rows() == rows_before
    assert fleet.actions_recorded() == recorded_before
    # No double launch, no orphan: exactly the target runs, each host with its live row and each row with its host.
    assert fleet.converged()
    named = {name for name, _status, _cloud_id in fleet.rows()}
    every = ec2_hosts(fleet.ec2, fleet.commit, ("pending", "running", "shutting-down", "terminated"))
    assert {tag(i, "fractal:instance-name") for i in every.values()} <= named  # every host EC2 ever ran has a row
