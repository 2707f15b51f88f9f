"""Leaks and trust (issue 18, item 4): a TERMINATED instance's secret stops working, HOST_MISMATCH does not tell the
host which commit to claim, SMTP credentials never travel without TLS unless the URL says so explicitly."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fractal.auth.hosts import hash_host_secret
from fractal.fleet.instances import move_instances
from fractal.mail.backends import MailDeliveryError, OutgoingMail, SmtpBackend
from fractal.mail.registry import render_mail
from fractal.models import Heartbeat, Instance, InstanceStatus
from test.factories import Factories
from test.servers import Inbox, free_port


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_a_terminated_instances_secret_stops_working(host_client: Any, factories: Factories, db: Session) -> None:
    instance, secret = factories.instance(status=InstanceStatus.TERMINATING)
    box = uuid.uuid4()
    heartbeat = {"instance_name": instance.instance_name, "mandelboxes": [], "metrics": {}}
    assert host_client.post("/host/heartbeat", json=heartbeat, headers=bearer(secret)).status_code == 200

    # The cloud confirmed the host gone: the fleet core moves it to TERMINATED (the scaler's path).
    moved = move_instances(
        db,
        where=Instance.instance_name == instance.instance_name,
        to=InstanceStatus.TERMINATED,
        actor="scaler",
        reason="confirmed_gone",
    )
    assert len(moved) == 1
    db.commit()

    attempts = [
        host_client.post("/host/heartbeat", json=heartbeat, headers=bearer(secret)),
        host_client.get(f"/host/mandelboxes/{box}", headers=bearer(secret)),
        host_client.put(f"/host/mandelboxes/{box}", json={"status": "RUNNING"}, headers=bearer(secret)),
        host_client.put(f"/host/mandelboxes/{box}/logs", data=b"log", headers=bearer(secret)),
        host_client.post(
            "/host/handshake",
            json={
                "instance_name": instance.instance_name,
                "ip": "10.0.0.1",
                "client_commit_hash": instance.client_commit_hash,
                "mandelbox_capacity": 4,
            },
            headers=bearer(secret),
        ),
    ]
    for response in attempts:
        assert response.status_code == 401, (response.request.path, response.get_data(as_text=True))
        assert response.json["error"] == "UNAUTHORIZED"


def test_host_mismatch_does_not_reveal_the_registered_commit(host_client: Any, factories: Factories) -> None:
    instance, secret = factories.instance(
        status=InstanceStatus.PRE_CONNECTION, ip=None, client_commit_hash="registered-commit-7f3a"
    )
    response = host_client.post(
        "/host/handshake",
        json={
            "instance_name": instance.instance_name,
            "ip": "10.0.0.1",
            "client_commit_hash": "guess",
            "mandelbox_capacity": 4,
        },
        headers=bearer(secret),
    )
    assert response.status_code == 409 and response.json["error"] == "HOST_MISMATCH"
    assert "registered-commit-7f3a" not in response.get_data(as_text=True)


class _PlainAuthServer:
    """An SMTP server on loopback that offers no TLS but accepts AUTH (what a STARTTLS-stripping attacker shows)."""

    def __init__(self) -> None:
        self.inbox = Inbox()
        self.port = free_port()

        def authenticator(_server: Any, _session: Any, _envelope: Any, _mechanism: str, data: Any) -> AuthResult:
            if isinstance(data, LoginPassword):
                self.inbox.logins.append(data.login.decode())
            return AuthResult(success=True)

        self.controller = Controller(
            self.inbox,
            hostname="127.0.0.1",
            port=self.port,
            authenticator=authenticator,
            auth_required=True,
            auth_require_tls=False,
        )


@pytest.fixture
def plain_auth_server() -> Iterator[_PlainAuthServer]:
    server = _PlainAuthServer()
    server.controller.start()
    try:
        yield server
    finally:
        server.controller.stop()


def _mail() -> OutgoingMail:
    return OutgoingMail(sender="ops@fractal.test", to="ada@example.com", rendered=render_mail("welcome", {"name": "A"}))


pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


def test_smtp_credentials_are_never_sent_without_tls(plain_auth_server: _PlainAuthServer) -> None:
    backend = SmtpBackend(f"smtp://mailer:s3cret-pw@127.0.0.1:{plain_auth_server.port}")
    with pytest.raises(MailDeliveryError) as refused:
        backend.send(_mail())
    assert "s3cret-pw" not in str(refused.value)
    assert plain_auth_server.inbox.logins == [] and plain_auth_server.inbox.messages == []


def test_an_explicit_insecure_url_allows_plaintext_auth(plain_auth_server: _PlainAuthServer) -> None:
    backend = SmtpBackend(f"smtp+insecure://mailer:s3cret-pw@127.0.0.1:{plain_auth_server.port}")
    backend.send(_mail())
    assert plain_auth_server.inbox.logins == ["mailer"]
    assert len(plain_auth_server.inbox.messages) == 1


def test_a_remembered_secret_is_checked_again_by_the_heartbeat_statement(
    host_client: Any, factories: Factories, db: Session
) -> None:
    """The heartbeat route remembers which instance a secret names (one round trip less); the statement that
    writes the heartbeat re-checks the secret's digest and the status, so a replaced secret or a TERMINATED
    instance is refused at once and its heartbeats row is left as it was."""
    instance, secret = factories.instance(status=InstanceStatus.ACTIVE)
    name = instance.instance_name
    heartbeat = {"instance_name": name, "mandelboxes": [], "metrics": {"n": 1}}
    assert host_client.post("/host/heartbeat", json=heartbeat, headers=bearer(secret)).status_code == 200
    db.execute(update(Instance).where(Instance.instance_name == name).values(host_secret_hash=hash_host_secret("new")))
    db.commit()
    refused = host_client.post("/host/heartbeat", json={**heartbeat, "metrics": {"n": 2}}, headers=bearer(secret))
    assert refused.status_code == 401 and refused.json["error"] == "UNAUTHORIZED"
    db.expire_all()
    assert db.execute(select(Heartbeat.metrics).where(Heartbeat.instance_name == name)).scalar_one() == {"n": 1}
    # The new secret works (and is remembered in turn); once TERMINATED it stops too.
    assert host_client.post("/host/heartbeat", json=heartbeat, headers=bearer("new")).status_code == 200
    move_instances(db, where=Instance.instance_name == name, to=InstanceStatus.DRAINING, actor="test", reason="t")
    move_instances(db, where=Instance.instance_name == name, to=InstanceStatus.TERMINATING, actor="test", reason="t")
    move_instances(db, where=Instance.instance_name == name, to=InstanceStatus.TERMINATED, actor="test", reason="t")
    db.commit()
    assert host_client.post("/host/heartbeat", json=heartbeat, headers=bearer("new")).status_code == 401
