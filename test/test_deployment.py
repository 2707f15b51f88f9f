"""The deployment, tested: two replicas of each API behind Debian's nginx, PgBouncer in transaction-pooling mode
from Debian's package in front of Postgres, two scaler processes on a moto EC2 server, all on loopback.

Every process reaches Postgres only through PgBouncer, whose pool holds a few server connections for all of them;
the database starts empty and every process migrates it at once through PgBouncer (one does, under a
transaction-scoped advisory lock). Through nginx: an assign race, the per-user limit shared by the replicas, one
Idempotency-Key at both replicas at once, handshakes and heartbeats, the failed-handshake limit keyed on the real
client behind the proxy, a scaler SIGKILLed mid-pass. Afterwards no advisory lock and no open transaction is left
on any server connection.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import psycopg2
import pytest

from fractal.auth.dev_keys import DevKeyPair, mint_token
from fractal.cloud.host_agent import HostAgent
from test.deployment import (
    Answer,
    Deployment,
    agent_for,
    bearer,
    call,
    debian_binary,
    deployment,
    ec2_hosts,
    stop_all,
    tag,
)
from test.redis_support import REDIS_SERVER_URL, delete_prefixed, unique_prefix
from test.waiting import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        debian_binary("pgbouncer") is None or debian_binary("nginx") is None,
        reason="needs Debian's pgbouncer and nginx (./commands test installs them)",
    ),
]

REGION = "us-east-1"
CAPACITY = 1  # one slot per host: every assign lands on its own instance, every slot is one EC2 host
TARGET_FREE = 6
USERS = 10  # racing for TARGET_FREE slots
# Short, so the SIGKILLed leader is replaced quickly, but longer than any one cloud call on a busy machine (the
# first one in a process builds boto3's EC2 client): a renewal comes before each call.
LEASE_TTL_S = 5.0
SCALER_INTERVAL_S = 1.0
ASSIGN_LIMIT = 3  # per user per minute, shared by the replicas through Redis
HANDSHAKE_FAILURES = 3  # per client address per minute
LIVE = ("PRE_CONNECTION", "ACTIVE", "DRAINING")


@dataclass
class Stack:
    deployment: Deployment
    keypair: DevKeyPair
    ec2: Any
    commit: str

    def token(self, user: str, *, admin: bool = False) -> dict[str, str]:
        return bearer(mint_token(self.keypair.private_pem, user_id=user, admin=admin))

    _connection: Any = None

    def sql(self, query: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Straight to Postgres (not through PgBouncer), autocommit, on one connection kept for the module."""
        if self._connection is None or self._connection.closed:
            self._connection = psycopg2.connect(self.deployment.database_url)
            self._connection.autocommit = True
        with self._connection.cursor() as cursor:
            cursor.execute(query, params or {})
            return cursor.fetchall() if cursor.description else []

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


@pytest.fixture(scope="module")
def stack(moto_endpoint: str, keypair: DevKeyPair) -> Iterator[Stack]:
    prefix = unique_prefix()
    env = {
        "FRACTAL_ENV": "test",
        "FRACTAL_JWT_PUBLIC_KEY": keypair.public_pem,
        "FRACTAL_CLOUD": "aws",
        "AWS_ENDPOINT_URL_EC2": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "REDIS_URL": REDIS_SERVER_URL,
        "FRACTAL_REDIS_PREFIX": prefix,
        "FRACTAL_SCALER_INTERVAL_S": str(SCALER_INTERVAL_S),
        "FRACTAL_SCALER_LEASE_TTL_S": str(LEASE_TTL_S),
        # The race's refused users would count as waiting for 30 s and grow the fleet beyond 2 x TARGET_FREE for
        # that long; this test counts hosts exactly, so it leaves the waiting users out (test_buffer_policy has them).
        "FRACTAL_SCALER_WAITING_WINDOW_S": "0",
        "FRACTAL_TARGET_FREE_MANDELBOXES": "0",
        "FRACTAL_MAX_INSTANCES_PER_REGION": "60",
        "FRACTAL_ASSIGN_RATE_LIMIT": f"{ASSIGN_LIMIT} per minute",
        "FRACTAL_HANDSHAKE_FAILURE_RATE_LIMIT": f"{HANDSHAKE_FAILURES} per minute",
        "FRACTAL_HEARTBEAT_INTERVAL_S": "1",
        "FRACTAL_LOG_LEVEL": "INFO",
    }
    ec2 = boto3.client(
        "ec2",
        region_name=REGION,
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    try:
        with deployment(env, replicas=2, scalers=2) as started:
            stack = Stack(started, keypair, ec2, f"deploy-{uuid.uuid4().hex[:8]}")
            try:
                yield stack
            finally:
                stack.close()
    finally:
        delete_prefixed(REDIS_SERVER_URL, prefix)


# --- helpers --------------------------------------------------------------------------------------------------


def at_once(*requests: Any) -> list[Answer]:
    """Send every (callable) request at the same moment from its own thread; answers in the same order."""
    barrier = threading.Barrier(len(requests))
    answers: list[Answer | None] = [None] * len(requests)

    def run(index: int) -> None:
        barrier.wait(timeout=30)
        answers[index] = requests[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(answer is not None for answer in answers), "a request did not finish"
    return [answer for answer in answers if answer is not None]


def assign(stack: Stack, user: str, *, idempotency_key: str | None = None, region: str = REGION) -> Answer:
    headers = stack.token(user)
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    body = {"regions": [region], "client_commit_hash": stack.commit}
    return call("POST", stack.deployment.url("public") + "/mandelbox/assign", body, headers=headers)


def replica_addresses(stack: Stack, role: str) -> set[str]:
    return {f"127.0.0.1:{process.port}" for process in stack.deployment.apis[role]}


def live_rows(stack: Stack) -> dict[str, str | None]:
    """instance name → provider id of this commit's live rows."""
    rows = stack.sql(
        "SELECT instance_name, cloud_provider_id FROM instances WHERE client_commit_hash = %(c)s"
        " AND status IN ('PRE_CONNECTION', 'ACTIVE', 'DRAINING')",
        {"c": stack.commit},
    )
    return dict(rows)  # type: ignore[arg-type]


def fleet_matches_ec2(stack: Stack, expected: int) -> bool:
    """Exactly ``expected`` live rows, each with its running EC2 host, and no other host running for the commit."""
    rows = live_rows(stack)
    running = {iid: tag(i, "fractal:instance-name") for iid, i in ec2_hosts(stack.ec2, stack.commit).items()}
    return len(rows) == expected and running == {cloud_id: name for name, cloud_id in rows.items()}


def start_agents(stack: Stack, names: set[str] | None = None) -> list[HostAgent]:
    """Host agents for this commit's running EC2 hosts (optionally only ``names``), shaking hands through nginx."""
    agents = []
    for instance in ec2_hosts(stack.ec2, stack.commit).values():
        if names is not None and tag(instance, "fractal:instance-name") not in names:
            continue
        agent = agent_for(stack.ec2, instance)
        assert agent.base_url == stack.deployment.url("host")  # the scaler told them nginx's host API
        agent.start()  # the handshake, then heartbeats every FRACTAL_HEARTBEAT_INTERVAL_S
        assert agent.status == "ACTIVE"
        agents.append(agent)
    return agents


def leader(stack: Stack) -> tuple[int, int] | None:
    """(pid, fencing token) of the scaler whose lease is live right now, if any."""
    rows = stack.sql("SELECT holder, fencing_token FROM leases WHERE name = 'scaler' AND expires_at > now()")
    if not rows:
        return None
    holder, token = rows[0]
    return int(str(holder).split(":")[-2]), int(token)


# --- the tests ------------------------------------------------------------------------------------------------


def test_every_process_migrated_the_empty_database_through_pgbouncer_and_one_ran_the_revisions(
    stack: Stack,
) -> None:
    logs = [process.log_text() for process in stack.deployment.processes()]
    revisions = stack.sql("SELECT version_num FROM alembic_version")
    assert len(revisions) == 1
    migrating = [log for log in logs if "Running upgrade" in log]
    assert len(migrating) == 1, "exactly one of the eight processes ran the migrations; the rest found head"
    assert all(process.process.poll() is None for replicas in stack.deployment.apis.values() for process in replicas)
    pools = stack.deployment.pgbouncer.show("POOLS")
    ours = [pool for pool in pools if pool["database"] == stack.deployment.database]
    assert ours and ours[0]["pool_mode"] == "transaction"


def test_assign_race_limits_idempotency_heartbeats_and_a_scaler_kill_through_nginx_and_pgbouncer(
    stack: Stack,
) -> None:
    d = stack.deployment
    admin = stack.token("operator", admin=True)
    image = {"ami_id": "ami-12345678", "active": True, "instance_type": "t3.micro"}
    put = call(
        "PUT",
        f"{d.url('admin')}/admin/images/{REGION}/{stack.commit}",
        {**image, "mandelbox_capacity": CAPACITY, "target_free": TARGET_FREE},
        headers=admin,
    )
    assert put.status in (200, 201), put

    # The scalers launch the buffer once (the lease: one pass at a time), hosts shake hands through nginx.
    wait_for(lambda: fleet_matches_ec2(stack, TARGET_FREE), timeout_s=40, message="the first buffer")
    agents = start_agents(stack)
    assert len(agents) == TARGET_FREE
    try:
        wait_for(lambda: all(a.heartbeats_sent >= 2 for a in agents), timeout_s=20, message="heartbeats")
        beats = stack.sql(
            "SELECT count(*) FROM heartbeats h JOIN instances i USING (instance_name)"
            " WHERE i.client_commit_hash = %(c)s AND h.last_heartbeat_at > now() - interval '10 seconds'",
            {"c": stack.commit},
        )
        assert beats[0][0] == TARGET_FREE
        assert all(a.last_error is None for a in agents)

        # The race: more users than free slots, at once, through nginx to both replicas.
        users = [f"racer-{i}-{uuid.uuid4().hex[:6]}" for i in range(USERS)]
        answers = at_once(*(lambda u=u: assign(stack, u) for u in users))
        statuses = sorted(a.status for a in answers)
        assert statuses == [201] * TARGET_FREE + [503] * (USERS - TARGET_FREE), [(a.status, a.body) for a in answers]
        assert {a.error for a in answers if a.status == 503} == {"NO_INSTANCE_AVAILABLE"}
        assert all("retry-after" in a.headers for a in answers if a.status == 503)
        assert {a.upstream for a in answers} == replica_addresses(stack, "public")
        over = stack.sql(
            "SELECT i.instance_name FROM instances i LEFT JOIN mandelboxes m ON m.instance_name = i.instance_name"
            " AND m.status NOT IN ('EXITED') GROUP BY i.instance_name, i.mandelbox_capacity, i.live_mandelboxes"
            " HAVING count(m.mandelbox_id) > i.mandelbox_capacity OR i.live_mandelboxes > i.mandelbox_capacity"
            " OR i.live_mandelboxes <> count(m.mandelbox_id)"
        )
        assert over == []

        # The refusals nudged the scalers: kill the leader in the middle of the pass that launches the next buffer.
        killed = kill_the_leader_mid_launch(stack)
        survivor = next(s for s in d.scalers if s.process.pid != killed.pid)
        taken = wait_for(
            lambda: (held := leader(stack)) and held[0] == survivor.process.pid and held[1] > killed.token and held,
            timeout_s=LEASE_TTL_S + SCALER_INTERVAL_S + 10,
            interval_s=0.05,
            message="the survivor taking the lease",
        )
        # Within one lease period (plus the survivor's pass interval and this busy machine's slack).
        assert time.monotonic() - killed.at < LEASE_TTL_S + SCALER_INTERVAL_S + 4, taken
        # The fleet reaches its target: TARGET_FREE occupied hosts plus TARGET_FREE free ones, each with exactly one
        # EC2 host; whatever the killed pass launched without recording was terminated, nothing launched twice.
        wait_for(lambda: fleet_matches_ec2(stack, 2 * TARGET_FREE), timeout_s=40, message="the fleet's target")
        assert not any((cid or "").startswith("pending:") for cid in live_rows(stack).values())
        if killed.launching:  # the dead pass's rows were taken for unconfirmed launches and cleaned up
            unconfirmed = stack.sql(
                "SELECT count(*) FROM events WHERE kind = 'instance.terminating'"
                " AND detail->>'reason' = 'launch_unconfirmed'"
            )
            assert unconfirmed[0][0] >= 1
        more = start_agents(stack, names=set(live_rows(stack)) - {a.instance_name for a in agents})
        agents += more
        assert len(more) == TARGET_FREE

        # The per-user assign limit holds across the replicas (Redis): exactly ASSIGN_LIMIT get past it.
        limited_user = f"limited-{uuid.uuid4().hex[:6]}"
        limited = [assign(stack, limited_user, region="eu-west-3") for _ in range(2 * ASSIGN_LIMIT)]
        assert [a.status for a in limited] == [422] * ASSIGN_LIMIT + [429] * ASSIGN_LIMIT, limited
        assert {a.upstream for a in limited} == replica_addresses(stack, "public")

        # One Idempotency-Key at both replicas at once: one mandelbox, the same answer twice.
        key = f"key-{uuid.uuid4().hex}"
        same_user = f"idem-{uuid.uuid4().hex[:6]}"
        first, second = at_once(*[lambda: assign(stack, same_user, idempotency_key=key)] * 2)
        assert (first.status, second.status) == (201, 201), (first, second)
        assert first.body == second.body
        assert {first.upstream, second.upstream} == replica_addresses(stack, "public")
        replayed = sorted(str(answer.headers.get("idempotent-replayed")) for answer in (first, second))
        assert replayed == ["None", "true"]  # one assigned, the other replayed its stored answer
        boxes = stack.sql("SELECT count(*) FROM mandelboxes WHERE user_id = %(u)s", {"u": same_user})
        assert boxes[0][0] == 1
    finally:
        for agent in agents:
            agent.stop()
    assert all(a.last_error is None for a in agents), [a.last_error for a in agents]

    # Quiet: scalers stopped (each finishes its pass), agents stopped. Nothing is left held on a server connection.
    stop_all(d.scalers)
    assert_no_session_state_left(stack)


@dataclass
class Killed:
    pid: int
    token: int
    at: float
    launching: bool  # caught with launches in flight (rows still pending)


def kill_the_leader_mid_launch(stack: Stack) -> Killed:
    """SIGKILL the scaler that holds the lease while its pass has launches in flight (rows still ``pending:``);
    after a while without catching one in that window, any pass under way will do."""
    import os
    import signal

    pids = {s.process.pid for s in stack.deployment.scalers}
    started = time.monotonic()
    while time.monotonic() - started < 30:
        rows = stack.sql(
            "SELECT l.holder, l.fencing_token, EXISTS (SELECT 1 FROM instances WHERE status = 'PRE_CONNECTION'"
            " AND cloud_provider_id LIKE 'pending:%%' AND client_commit_hash = %(c)s)"
            " FROM leases l WHERE l.name = 'scaler' AND l.expires_at > now()",
            {"c": stack.commit},
        )
        if rows:
            holder, token, launching = rows[0]
            pid = int(str(holder).split(":")[-2])
            if pid in pids and (launching or time.monotonic() - started > 10):
                os.kill(pid, signal.SIGKILL)
                at = time.monotonic()
                next(s for s in stack.deployment.scalers if s.process.pid == pid).process.wait(timeout=10)
                return Killed(pid=pid, token=int(token), at=at, launching=bool(launching))
        time.sleep(0.003)
    raise AssertionError("no scaler pass was seen holding the lease within 30 s")


def assert_no_session_state_left(stack: Stack) -> None:
    """No advisory lock, no transaction open (or idle in one) on any of Postgres's connections to this database,
    and PgBouncer's server connections really were shared (far fewer than its clients)."""
    d = stack.deployment

    def quiet() -> bool:
        busy = stack.sql(
            "SELECT pid, state, query FROM pg_stat_activity WHERE datname = %(db)s AND pid <> pg_backend_pid()"
            " AND (state <> 'idle' OR xact_start IS NOT NULL)",
            {"db": d.database},
        )
        return not busy

    wait_for(quiet, timeout_s=10, message="every server connection idle")
    locks = stack.sql(
        "SELECT l.objid, a.state FROM pg_locks l JOIN pg_database db ON db.oid = l.database"
        " LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND db.datname = %(db)s",
        {"db": d.database},
    )
    assert locks == []
    servers = stack.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %(db)s AND pid <> pg_backend_pid()", {"db": d.database}
    )[0][0]
    clients = [c for c in d.pgbouncer.show("CLIENTS") if c["database"] == d.database]
    assert 1 <= servers <= d.pgbouncer.pool_size
    assert len(clients) > 2 * servers, (len(clients), servers)  # the replicas' pools share a few server connections
    lease = stack.sql("SELECT expires_at <= now() FROM leases WHERE name = 'scaler'")
    assert lease == [(True,)]  # the last leader released it on SIGTERM


def test_failed_handshakes_are_counted_per_real_client_behind_nginx(stack: Stack) -> None:
    d = stack.deployment
    admin = stack.token("operator", admin=True)
    region, commit = "us-west-2", f"hs-{uuid.uuid4().hex[:8]}"
    image = {"ami_id": "ami-12345678", "active": True, "instance_type": "t3.micro", "mandelbox_capacity": 1}
    put = call("PUT", f"{d.url('admin')}/admin/images/{region}/{commit}", {**image, "target_free": 0}, headers=admin)
    assert put.status in (200, 201), put
    name = f"hand-{uuid.uuid4().hex[:8]}"
    created = call(
        "POST",
        d.url("admin") + "/admin/instances",
        {"instance_name": name, "region": region, "client_commit_hash": commit, "mandelbox_capacity": 1},
        headers=admin,
    )
    assert created.status == 201, created
    secret = created.body["host_secret"]
    url = d.url("host") + "/host/handshake"

    def handshake(source: str, secret: str, instance: str, **headers: str) -> Answer:
        body = {"instance_name": instance, "ip": "10.0.0.9", "client_commit_hash": commit, "mandelbox_capacity": 1}
        return call("POST", url, body, headers={**bearer(secret), **headers}, source=source)

    def failure(source: str, **headers: str) -> int:
        return handshake(source, "wrong-" + uuid.uuid4().hex, f"nobody-{uuid.uuid4().hex[:8]}", **headers).status

    # One client (127.0.0.2) spends its budget; a forged X-Forwarded-For does not reset it (nginx appends the
    # real address and the app believes one hop only).
    assert [failure("127.0.0.2") for _ in range(HANDSHAKE_FAILURES)] == [401] * HANDSHAKE_FAILURES
    assert failure("127.0.0.2") == 429
    assert failure("127.0.0.2", **{"X-Forwarded-For": "203.0.113.50"}) == 429
    # Another client behind the same nginx has its own budget: keyed on its address, not the proxy's.
    assert failure("127.0.0.3") == 401
    # And a host with its right secret is never refused, from either address.
    assert handshake("127.0.0.3", secret, name).status == 200
    assert handshake("127.0.0.2", secret, name).status == 200
