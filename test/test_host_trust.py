"""Leaks and trust (issue 18, item 4): a TERMINATED instance's secret stops working, HOST_MISMATCH does not tell the
host which commit to claim, SMTP credentials never travel without TLS unless the URL says so explicitly."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from sqlalchemy.orm import Session

from fractal.fleet.instances import move_instances
from fractal.mail.backends import MailDeliveryError, OutgoingMail, SmtpBackend
from fractal.mail.registry import render_mail
from fractal.models import Instance, InstanceStatus
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
