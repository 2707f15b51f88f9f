"""Admin mail API against a real SMTP server on loopback (aiosmtpd) and SES on a moto server."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from apiflask import APIFlask
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ses.models import ses_backends
from sqlalchemy import select
from sqlalchemy.orm import Session

from fractal.events import EventKind
from fractal.mail.backends import MailDeliveryError, OutgoingMail, SmtpBackend
from fractal.mail.registry import render_mail
from fractal.models import Event
from test.servers import SmtpServer, TlsSmtpServer, free_port


def mail_events(db: Session) -> list[Event]:
    return list(db.scalars(select(Event).where(Event.kind == str(EventKind.MAIL_SENT)).order_by(Event.id)))


def parts(message: Any) -> tuple[str, str]:
    return message.get_body(("plain",)).get_content(), message.get_body(("html",)).get_content()


@pytest.fixture
def smtp_admin(make_app: Callable[..., APIFlask], smtp_server: SmtpServer) -> Any:
    return make_app("admin", smtp_url=smtp_server.url, mail_from="ops@fractal.test").test_client()


def test_templates_are_listed_with_their_required_args(smtp_admin: Any, admin_headers: dict[str, str]) -> None:
    response = smtp_admin.get("/admin/mail/templates", headers=admin_headers)
    assert response.status_code == 200
    templates = {t["name"]: t for t in response.get_json()["templates"]}
    assert templates["welcome"]["required_args"] == ["name"]
    assert templates["welcome"]["subject"] == "Welcome to Fractal, {{ name }}"
    assert "confirm_url" in templates["newsletter_confirm"]["required_args"]


def test_mail_api_needs_the_admin_scope(smtp_admin: Any, user_headers: Callable[..., dict[str, str]]) -> None:
    assert smtp_admin.get("/admin/mail/templates").status_code == 401
    body = {"template": "welcome", "to": "ada@example.com", "args": {"name": "Ada"}}
    response = smtp_admin.post("/admin/mail", json=body, headers=user_headers("someone"))
    assert response.status_code == 403
    assert response.get_json()["error"] == "FORBIDDEN"


def test_welcome_mail_arrives_over_smtp_with_both_parts_and_an_event(
    smtp_admin: Any, smtp_server: SmtpServer, admin_headers: dict[str, str], db: Session
) -> None:
    body = {"template": "welcome", "to": "ada@example.com", "args": {"name": "Ada", "unused": "ignored"}}
    response = smtp_admin.post("/admin/mail", json=body, headers=admin_headers)

    assert response.status_code == 202, response.get_json()
    message_id = response.get_json()["message_id"]
    [message] = smtp_server.inbox.messages
    assert smtp_server.inbox.recipients == [["ada@example.com"]]
    assert message["Subject"] == "Welcome to Fractal, Ada"
    assert message["From"] == "ops@fractal.test"
    assert message["To"] == "ada@example.com"
    assert message["Message-ID"] == message_id
    text, html = parts(message)
    assert "Hi Ada," in text and "<" not in text
    assert "<p>Hi Ada,</p>" in html
    [event] = mail_events(db)
    assert event.actor == "admin:operator"
    assert event.detail == {"template": "welcome", "to": "ada@example.com", "message_id": message_id, "backend": "smtp"}


def test_arguments_are_escaped_in_html_and_cannot_inject_headers(
    smtp_admin: Any, smtp_server: SmtpServer, admin_headers: dict[str, str]
) -> None:
    name = "<b>Eve</b>\r\nBcc: victim@example.com"
    response = smtp_admin.post(
        "/admin/mail",
        json={"template": "welcome", "to": "eve@example.com", "args": {"name": name}},
        headers=admin_headers,
    )
    assert response.status_code == 202
    [message] = smtp_server.inbox.messages
    assert smtp_server.inbox.recipients == [["eve@example.com"]]
    assert message["Bcc"] is None
    assert message["Subject"] == "Welcome to Fractal, <b>Eve</b> Bcc: victim@example.com"
    _text, html = parts(message)
    assert "&lt;b&gt;Eve&lt;/b&gt;" in html and "<b>Eve</b>" not in html


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"template": "farewell", "to": "ada@example.com", "args": {"name": "Ada"}}, "farewell"),
        ({"template": "welcome", "to": "ada@example.com", "args": {}}, "name"),
        ({"template": "welcome", "to": "ada@example.com"}, "name"),
        (
            {"template": "newsletter_confirm", "to": "ada@example.com", "args": {"confirm_url": "x"}},
            "unsubscribe_url, expires_in_hours",
        ),
    ],
)
def test_unknown_template_or_missing_args_is_422_naming_them_and_nothing_is_sent(
    smtp_admin: Any,
    smtp_server: SmtpServer,
    admin_headers: dict[str, str],
    db: Session,
    body: dict[str, Any],
    named: str,
) -> None:
    response = smtp_admin.post("/admin/mail", json=body, headers=admin_headers)
    assert response.status_code == 422
    answer = response.get_json()
    assert answer["error"] == "VALIDATION_ERROR"
    assert named in answer["message"]
    assert smtp_server.inbox.messages == []
    assert mail_events(db) == []


@pytest.mark.parametrize(
    "body",
    [
        {"template": "welcome", "to": "not-an-address", "args": {"name": "Ada"}},
        {"template": "welcome", "to": "ada@", "args": {"name": "Ada"}},
        {"template": "welcome", "to": "Ada <ada@example.com>", "args": {"name": "Ada"}},
        {"template": "welcome", "to": "ada@example.com", "args": {"name": 7}},
        {"template": "welcome", "to": "ada@example.com", "args": ["name"]},
        {"template": 3, "to": "ada@example.com", "args": {"name": "Ada"}},
        {"to": "ada@example.com"},
    ],
)
def test_malformed_mail_requests_are_400(
    smtp_admin: Any, smtp_server: SmtpServer, admin_headers: dict[str, str], body: dict[str, Any]
) -> None:
    response = smtp_admin.post("/admin/mail", json=body, headers=admin_headers)
    assert response.status_code == 400
    assert response.get_json()["error"] == "VALIDATION_ERROR"
    assert smtp_server.inbox.messages == []


def test_unreachable_smtp_server_is_503_without_an_event(
    make_app: Callable[..., APIFlask], admin_headers: dict[str, str], db: Session
) -> None:
    client = make_app("admin", smtp_url=f"smtp://127.0.0.1:{free_port()}").test_client()
    body = {"template": "welcome", "to": "ada@example.com", "args": {"name": "Ada"}}
    response = client.post("/admin/mail", json=body, headers=admin_headers)
    assert response.status_code == 503
    assert response.get_json()["error"] == "SERVICE_UNAVAILABLE"
    assert mail_events(db) == []


def test_logs_name_the_mail_but_never_hold_its_body(
    make_app: Callable[..., APIFlask],
    smtp_server: SmtpServer,
    admin_headers: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = make_app("admin", smtp_url=smtp_server.url).test_client()  # logging bound to the captured stderr
    body = {"template": "welcome", "to": "ada@example.com", "args": {"name": "Zebulon-Quartz"}}
    assert client.post("/admin/mail", json=body, headers=admin_headers).status_code == 202
    logged = capsys.readouterr().err
    assert '"event": "mail_sent"' in logged
    assert "Zebulon-Quartz" not in logged
    assert admin_headers["Authorization"].split()[1] not in logged


def welcome_mail() -> OutgoingMail:
    rendered = render_mail("welcome", {"name": "Ada"})
    return OutgoingMail(sender="ops@fractal.test", to="ada@example.com", rendered=rendered)


def test_starttls_is_used_when_offered_and_auth_when_given(starttls_smtp_server: TlsSmtpServer) -> None:
    mail = OutgoingMail(
        sender="ops@fractal.test", to="ada@example.com", rendered=render_mail("welcome", {"name": "Ada"})
    )
    backend = SmtpBackend(starttls_smtp_server.url, ssl_context=starttls_smtp_server.tls.client_context)

    message_id = backend.send(mail)

    [message] = starttls_smtp_server.inbox.messages
    assert message["Message-ID"] == message_id
    assert message["Subject"] == "Welcome to Fractal, Ada"
    assert starttls_smtp_server.inbox.logins == ["mailer"]


def test_starttls_refuses_an_untrusted_certificate_and_bad_credentials_without_echoing_them(
    starttls_smtp_server: TlsSmtpServer,
) -> None:
    mail = OutgoingMail(
        sender="ops@fractal.test", to="ada@example.com", rendered=render_mail("welcome", {"name": "Ada"})
    )
    with pytest.raises(MailDeliveryError):
        SmtpBackend(starttls_smtp_server.url).send(mail)  # system trust store: the self-signed cert fails
    wrong = starttls_smtp_server.url.replace("s3cret-pw", "wrong-pw")
    with pytest.raises(MailDeliveryError) as raised:
        SmtpBackend(wrong, ssl_context=starttls_smtp_server.tls.client_context, timeout_s=2).send(mail)
    assert "wrong-pw" not in str(raised.value)
    assert starttls_smtp_server.inbox.messages == []


def test_implicit_tls_for_smtps_urls(starttls_smtp_server: TlsSmtpServer) -> None:
    # An smtps:// URL opens TLS first; a plain SMTP server on that port cannot complete the handshake.
    mail = OutgoingMail(
        sender="ops@fractal.test", to="ada@example.com", rendered=render_mail("welcome", {"name": "Ada"})
    )
    url = f"smtps://127.0.0.1:{starttls_smtp_server.port}"
    backend = SmtpBackend(url, ssl_context=starttls_smtp_server.tls.client_context, timeout_s=3)
    assert backend.target.implicit_tls
    with pytest.raises(MailDeliveryError):
        backend.send(mail)


def test_welcome_mail_goes_through_ses_on_moto(
    make_app: Callable[..., APIFlask], aws_env: str, admin_headers: dict[str, str], db: Session
) -> None:
    ses = boto3.client("ses", endpoint_url=aws_env)
    ses.verify_email_identity(EmailAddress="ses-sender@fractal.test")
    sent_before = ses.get_send_quota()["SentLast24Hours"]
    client = make_app("admin", mail_backend="ses", mail_from="ses-sender@fractal.test").test_client()

    body = {"template": "welcome", "to": "grace@example.com", "args": {"name": "Grace"}}
    response = client.post("/admin/mail", json=body, headers=admin_headers)

    assert response.status_code == 202, response.get_json()
    message_id = response.get_json()["message_id"]
    assert ses.get_send_quota()["SentLast24Hours"] > sent_before
    # SES has no API to read a sent mail back; moto keeps it in its (in-process) backend.
    [raw] = [m for m in ses_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].sent_messages if m.id == message_id]
    assert set(raw.destinations) == {"grace@example.com"}  # moto lists the To header as well
    message = email.message_from_string(raw.raw_data, policy=email.policy.default)
    assert message["Subject"] == "Welcome to Fractal, Grace"
    text, html = parts(message)
    assert "Hi Grace," in text and "<p>Hi Grace,</p>" in html
    [event] = mail_events(db)
    assert event.detail["backend"] == "ses" and event.detail["message_id"] == message_id


def test_ses_refusal_is_503(make_app: Callable[..., APIFlask], aws_env: str, admin_headers: dict[str, str]) -> None:
    client = make_app("admin", mail_backend="ses", mail_from="never-verified@fractal.test").test_client()
    body = {"template": "welcome", "to": "grace@example.com", "args": {"name": "Grace"}}
    response = client.post("/admin/mail", json=body, headers=admin_headers)
    assert response.status_code == 503
    assert response.get_json()["error"] == "SERVICE_UNAVAILABLE"
