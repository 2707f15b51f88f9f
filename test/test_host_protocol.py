"""The host protocol end to end over HTTP, driven by the reference agent, against Postgres."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from fractal.auth.hosts import hash_host_secret
from fractal.cloud.host_agent import HostAgent, HostAgentError, WsgiTransport
from fractal.config import normalise_database_url
from fractal.database import SessionFactory
from fractal.events import EventKind
from fractal.models import EndReason, Event, Heartbeat, Instance, InstanceStatus, Mandelbox, MandelboxStatus
from test.factories import Factories

Headers = Callable[..., dict[str, str]]
ASSIGN = {"regions": ["us-east-1"], "client_commit_hash": "abc123"}


@pytest.fixture
def host_app(make_app: Callable[..., Any]) -> Any:
    return make_app("host")


@pytest.fixture
def make_agent(host_app: Any) -> Callable[..., HostAgent]:
    def _make(instance_name: str, secret: str, **overrides: Any) -> HostAgent:
        values: dict[str, Any] = {
            "instance_name": instance_name,
            "host_secret": secret,
            "ip": "10.1.2.3",
            "client_commit_hash": "abc123",
            "mandelbox_capacity": 3,
            "http": WsgiTransport(host_app.test_client()),
        }
        values.update(overrides)
        return HostAgent("", **values)

    return _make


def register(admin_client: Any, admin_headers: dict[str, str], name: str = "i-manual-1", **body: Any) -> str:
    payload = {"instance_name": name, "region": "us-east-1", "client_commit_hash": "abc123", "mandelbox_capacity": 2}
    payload.update(body)
    response = admin_client.post("/admin/instances", json=payload, headers=admin_headers)
    assert response.status_code == 201, response.json
    assert response.json["instance_name"] == name
    assert response.json["status"] == "PRE_CONNECTION"
    secret: str = response.json["host_secret"]
    return secret


def kinds(db: Session, instance_name: str) -> list[str]:
    return list(db.scalars(select(Event.kind).where(Event.instance_name == instance_name).order_by(Event.id)))


def test_full_lifecycle_register_handshake_assign_claim_delete_exit_drain(
    db: Session,
    factories: Factories,
    admin_client: Any,
    admin_headers: dict[str, str],
    public_client: Any,
    user_headers: Headers,
    make_agent: Callable[..., HostAgent],
) -> None:
    factories.image(ami_id="ami-from-image", instance_type="g5.xlarge")
    secret = register(admin_client, admin_headers, cloud_provider_id="i-0123456789")
    row = db.get(Instance, "i-manual-1")
    assert row is not None
    assert row.host_secret_hash == hash_host_secret(secret) and secret not in row.host_secret_hash
    assert (row.ami_id, row.instance_type, row.cloud_provider_id) == ("ami-from-image", "g5.xlarge", "i-0123456789")
    # Not assignable before the handshake.
    assert public_client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u1")).status_code == 503

    agent = make_agent("i-manual-1", secret, mandelbox_capacity=3)
    assert agent.handshake() == {"status": "ACTIVE", "heartbeat_interval_s": 10.0}
    db.expire_all()
    row = db.get(Instance, "i-manual-1")
    assert row is not None
    assert (row.status, row.ip, row.mandelbox_capacity) == (InstanceStatus.ACTIVE, "10.1.2.3", 3)

    assigned = public_client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u1"))
    assert assigned.status_code == 201
    assert assigned.json["ip"] == "10.1.2.3"
    box_id = assigned.json["mandelbox_id"]
    found = agent.get_mandelbox(box_id)
    assert found == {"mandelbox_id": box_id, "user_id": "u1", "session_id": None, "status": "ALLOCATED"}
    assert agent.claim(box_id)["status"] == "RUNNING"
    assert agent.heartbeat().stop_mandelboxes == []
    assert public_client.get(f"/mandelbox/{box_id}", headers=user_headers("u1")).json["status"] == "RUNNING"

    # The user deletes it: DYING, the host is told on its next heartbeat, reports EXITED, the slot is free.
    assert public_client.delete(f"/mandelbox/{box_id}", headers=user_headers("u1")).status_code == 202
    answer = agent.heartbeat(metrics={"cpu": 0.5})
    assert answer.stop_mandelboxes == [box_id]
    assert agent.mandelboxes() == {}
    db.expire_all()
    box = db.get(Mandelbox, uuid.UUID(box_id))
    assert box is not None
    assert (box.status, box.end_reason) == (MandelboxStatus.EXITED, EndReason.USER_DELETED)
    assert box.ended_at is not None
    assert db.get(Instance, "i-manual-1").live_mandelboxes == 0  # type: ignore[union-attr]
    heartbeat = db.get(Heartbeat, "i-manual-1")
    assert heartbeat is not None and heartbeat.metrics == {"cpu": 0.5}
    assert agent.heartbeat().stop_mandelboxes == []

    # Drain through the admin API; the agent's loop notices, and shuts down because it is empty.
    drained = admin_client.post("/admin/instances/i-manual-1/drain", headers=admin_headers)
    assert drained.status_code == 200
    assert drained.json["status"] == "DRAINING"
    assert drained.json["live_mandelboxes"] == 0
    assert drained.json["last_heartbeat_at"] is not None
    assert public_client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u2")).status_code == 503
    agent.interval_override = 0.01
    agent.start()
    assert agent.wait_stopped(10)
    assert agent.status == "DRAINING"

    assert kinds(db, "i-manual-1") == [
        EventKind.INSTANCE_REGISTERED,
        EventKind.INSTANCE_ACTIVATED,
        EventKind.INSTANCE_CAPACITY_CHANGED,
        EventKind.MANDELBOX_ASSIGNED,
        EventKind.MANDELBOX_STATUS,
        EventKind.MANDELBOX_STATUS,
        EventKind.MANDELBOX_DELETED,
        EventKind.MANDELBOX_STATUS,
        EventKind.INSTANCE_DRAINED,
    ]
    events = admin_client.get("/admin/events?limit=5", headers=admin_headers)
    assert events.status_code == 200
    assert len(events.json["events"]) == 5
    assert events.json["events"][0]["kind"] == "assignment.refused"  # newest first
    assert events.json["events"][1]["kind"] == EventKind.INSTANCE_DRAINED
    assert events.json["events"][1]["actor"] == "admin:operator"


def test_draining_agent_keeps_beating_until_its_last_mandelbox_exits(
    committed_factory: SessionFactory,
    make_app: Callable[..., Any],
    admin_headers: dict[str, str],
    user_headers: Headers,
) -> None:
    # The agent's loop thread and this test call the apps at once: real connections, not the test's savepoint.
    with committed_factory() as session:
        factories = Factories(session)
        factories.image()
        instance, secret = factories.instance(mandelbox_capacity=3)
    host = make_app("host", factory=committed_factory).test_client()
    admin = make_app("admin", factory=committed_factory).test_client()
    public = make_app("public", factory=committed_factory).test_client()
    agent = HostAgent(
        "",
        instance_name=instance.instance_name,
        host_secret=secret,
        ip="10.1.2.3",
        client_commit_hash="abc123",
        mandelbox_capacity=3,
        http=WsgiTransport(host),
        interval_s=0.01,
    )
    agent.handshake()
    box_id = public.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u1")).json["mandelbox_id"]
    agent.claim(box_id)
    assert admin.post(f"/admin/instances/{instance.instance_name}/drain", headers=admin_headers).status_code == 200
    agent.start()
    try:
        assert not agent.wait_stopped(0.3)  # still serving its RUNNING mandelbox
        assert agent.status == "DRAINING"
        assert agent.heartbeats_sent > 3
        with pytest.raises(HostAgentError) as refused:
            agent.claim(uuid.uuid4())
        assert refused.value.code == "DRAINING"
        agent.report(box_id, "EXITED")
        assert agent.wait_stopped(5)
    finally:
        agent.stop()
    with committed_factory() as session:
        row = session.get(Instance, instance.instance_name)
        assert row is not None and (row.status, row.live_mandelboxes) == (InstanceStatus.DRAINING, 0)


def test_restarted_hosts_keep_their_status_and_ended_hosts_are_refused(
    db: Session, factories: Factories, make_agent: Callable[..., HostAgent]
) -> None:
    for status in (InstanceStatus.ACTIVE, InstanceStatus.DRAINING):
        instance, secret = factories.instance(status=status, mandelbox_capacity=4)
        assert make_agent(instance.instance_name, secret, ip="10.9.9.9").handshake()["status"] == status
        db.expire_all()
        row = db.get(Instance, instance.instance_name)
        assert row is not None and (row.status, row.ip, row.mandelbox_capacity) == (status, "10.9.9.9", 3)
        assert kinds(db, instance.instance_name) == [
            EventKind.INSTANCE_RECONNECTED,
            EventKind.INSTANCE_CAPACITY_CHANGED,
        ]
    for status in (InstanceStatus.LOST, InstanceStatus.TERMINATING):
        instance, secret = factories.instance(status=status)
        with pytest.raises(HostAgentError) as refused:
            make_agent(instance.instance_name, secret).handshake()
        assert (refused.value.status, refused.value.code) == (409, "INVALID_TRANSITION")
        db.expire_all()
        assert db.get(Instance, instance.instance_name).status is status  # type: ignore[union-attr]
        assert kinds(db, instance.instance_name) == [EventKind.HOST_REFUSED]
    # A TERMINATED instance's host is gone: its secret no longer authenticates anyone (401, nothing recorded).
    instance, secret = factories.instance(status=InstanceStatus.TERMINATED)
    with pytest.raises(HostAgentError) as refused:
        make_agent(instance.instance_name, secret).handshake()
    assert (refused.value.status, refused.value.code) == (401, "UNAUTHORIZED")
    assert kinds(db, instance.instance_name) == []


def test_commit_hash_mismatch_is_host_mismatch_and_changes_nothing(
    db: Session, factories: Factories, make_agent: Callable[..., HostAgent]
) -> None:
    instance, secret = factories.instance(status=InstanceStatus.PRE_CONNECTION, ip=None)
    with pytest.raises(HostAgentError) as refused:
        make_agent(instance.instance_name, secret, client_commit_hash="other").handshake()
    assert (refused.value.status, refused.value.code) == (409, "HOST_MISMATCH")
    db.expire_all()
    row = db.get(Instance, instance.instance_name)
    assert row is not None and (row.status, row.ip) == (InstanceStatus.PRE_CONNECTION, None)
    assert db.get(Heartbeat, instance.instance_name) is None
    refusal = db.scalars(select(Event).where(Event.instance_name == instance.instance_name)).one()
    assert refusal.kind == EventKind.HOST_REFUSED and refusal.detail["code"] == "HOST_MISMATCH"


def test_capacity_below_live_count_is_refused(
    db: Session, factories: Factories, make_agent: Callable[..., HostAgent]
) -> None:
    instance, secret = factories.instance(mandelbox_capacity=4, live_mandelboxes=0)
    for _ in range(2):
        db.add(
            Mandelbox(instance_name=instance.instance_name, user_id=uuid.uuid4().hex, status=MandelboxStatus.RUNNING)
        )
    instance.live_mandelboxes = 2
    db.commit()
    with pytest.raises(HostAgentError) as refused:
        make_agent(instance.instance_name, secret, mandelbox_capacity=1).handshake()
    assert (refused.value.status, refused.value.code) == (409, "HOST_MISMATCH")


def test_heartbeat_tells_the_host_to_stop_mandelboxes_it_should_not_run(
    db: Session, factories: Factories, make_agent: Callable[..., HostAgent]
) -> None:
    instance, secret = factories.instance()
    other, _ = factories.instance()
    ended = Mandelbox(
        instance_name=instance.instance_name,
        user_id="u1",
        status=MandelboxStatus.EXITED,
        ended_at=instance.created_at,
        end_reason=EndReason.CLAIM_TIMEOUT,
    )
    foreign = Mandelbox(instance_name=other.instance_name, user_id="u2", status=MandelboxStatus.RUNNING)
    mine = Mandelbox(instance_name=instance.instance_name, user_id="u3", status=MandelboxStatus.RUNNING)
    db.add_all([ended, foreign, mine])
    db.commit()
    agent = make_agent(instance.instance_name, secret)
    for box in (ended, foreign, mine):
        agent._mandelboxes[str(box.mandelbox_id)] = "RUNNING"
    answer = agent.heartbeat()
    assert sorted(answer.stop_mandelboxes) == sorted([str(ended.mandelbox_id), str(foreign.mandelbox_id)])
    assert agent.mandelboxes() == {str(mine.mandelbox_id): "RUNNING"}
    db.expire_all()
    # The foreign one was refused (404) and left alone; the ended one stays as it was.
    assert db.get(Mandelbox, foreign.mandelbox_id).status is MandelboxStatus.RUNNING  # type: ignore[union-attr]
    assert db.get(Mandelbox, ended.mandelbox_id).end_reason is EndReason.CLAIM_TIMEOUT  # type: ignore[union-attr]


def test_lost_host_heartbeat_answers_lost_and_the_agent_stops_everything(
    factories: Factories, make_agent: Callable[..., HostAgent]
) -> None:
    instance, secret = factories.instance(status=InstanceStatus.LOST)
    agent = make_agent(instance.instance_name, secret, interval_s=0.01)
    agent._mandelboxes[str(uuid.uuid4())] = "RUNNING"
    agent.status = "ACTIVE"
    agent.start()
    assert agent.wait_stopped(5)
    assert agent.status == "LOST" and agent.mandelboxes() == {}


def test_secrets_are_never_logged(
    database_url: str,
    committed_factory: SessionFactory,
    make_app: Callable[..., Any],
    admin_headers: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # An engine that echoes every statement with its parameters, and apps built now so that their log handler
    # writes to capsys's stderr.
    engine = create_engine(normalise_database_url(database_url), echo=True)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    admin = make_app("admin", factory=factory).test_client()
    host = make_app("host", factory=factory, log_level="DEBUG").test_client()
    try:
        secret = register(admin, admin_headers, name="i-logged")
        agent = HostAgent(
            "",
            instance_name="i-logged",
            host_secret=secret,
            ip="10.0.0.1",
            client_commit_hash="abc123",
            mandelbox_capacity=2,
            http=WsgiTransport(host),
        )
        agent.handshake()
        agent.heartbeat()
        agent.client_commit_hash = "zzz"
        with pytest.raises(HostAgentError):
            agent.handshake()
        wrong = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
        bad = host.post(
            "/host/heartbeat", json={"instance_name": "i-logged"}, headers={"Authorization": f"Bearer {wrong}"}
        )
        assert bad.status_code == 401
        assert host.get("/host/nope", headers={"Authorization": f"Bearer {secret}"}).status_code == 404
    finally:
        engine.dispose()
        logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    captured = capsys.readouterr()
    logged = captured.out + captured.err
    assert "host_handshake" in logged and "host_refused" in logged and "host_secret_hash" in logged
    assert secret not in logged
    assert wrong not in logged


def test_agent_over_real_http(committed_factory: SessionFactory, make_app: Callable[..., Any]) -> None:
    from werkzeug.serving import make_server

    with committed_factory() as session:
        instance, secret = Factories(session).instance(status=InstanceStatus.PRE_CONNECTION, ip=None)
    server = make_server("127.0.0.1", 0, make_app("host", factory=committed_factory), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        agent = HostAgent(
            f"http://127.0.0.1:{server.server_port}",
            instance_name=instance.instance_name,
            host_secret=secret,
            ip="127.0.0.1",
            client_commit_hash="abc123",
            mandelbox_capacity=2,
            timeout_s=5,
        )
        assert agent.handshake()["status"] == "ACTIVE"
        assert agent.heartbeat().status == "ACTIVE"
        with pytest.raises(HostAgentError) as missing:
            agent.get_mandelbox(uuid.uuid4())
        assert (missing.value.status, missing.value.code) == (404, "NOT_FOUND")
    finally:
        server.shutdown()
        thread.join(5)
