"""Where mail goes: an SMTP server (smtplib) or Amazon SES (boto3), behind one small interface.

Backends are built from settings on first use (never at import) and connect per message: a transactional
mail is rare enough that a pooled connection would only add a failure mode (servers drop idle sessions).
"""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from fractal.config import MailBackend as MailBackendKind
from fractal.config import Settings
from fractal.mail.registry import RenderedMail

SMTP_TIMEOUT_S = 15.0


class MailDeliveryError(RuntimeError):
    """The backend refused or could not be reached; the message carries no secrets and no mail body."""


@dataclass(frozen=True)
class OutgoingMail:
    """A rendered mail addressed to one recipient."""

    sender: str
    to: str
    rendered: RenderedMail


class MailBackend(Protocol):
    """Sends one message; returns the message id the recipient will see (or the provider's id)."""

    name: str

    def send(self, mail: OutgoingMail) -> str: ...


def build_message(mail: OutgoingMail) -> EmailMessage:
    """A multipart/alternative message: plain text first, HTML preferred by clients that can show it."""
    message = EmailMessage()
    message["Subject"] = mail.rendered.subject
    message["From"] = mail.sender
    message["To"] = mail.to
    message["Date"] = formatdate(localtime=False, usegmt=True)
    domain = mail.sender.rpartition("@")[2] or "fractal.local"
    message["Message-ID"] = make_msgid(domain=domain)
    message.set_content(mail.rendered.text)
    message.add_alternative(mail.rendered.html, subtype="html")
    return message


@dataclass(frozen=True)
class SmtpTarget:
    """A parsed FRACTAL_SMTP_URL."""

    host: str
    port: int
    implicit_tls: bool
    username: str | None
    password: str | None
    # smtp+insecure:// only: credentials may go over a connection without TLS (a trusted local relay).
    allow_plaintext_auth: bool = False


# The scheme that says, explicitly, "this relay may receive the password without TLS".
INSECURE_SCHEME = "smtp+insecure"


def parse_smtp_url(url: str) -> SmtpTarget:
    """``smtp://[user:pass@]host:port`` (STARTTLS when offered; required before AUTH), ``smtps://`` (implicit TLS),
    or ``smtp+insecure://`` (STARTTLS when offered, AUTH even without it)."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps", INSECURE_SCHEME) or not parts.hostname:
        raise ValueError(
            "FRACTAL_SMTP_URL must look like smtp://[user:pass@]host:port, smtps://... or smtp+insecure://..."
        )
    implicit_tls = parts.scheme == "smtps"
    return SmtpTarget(
        host=parts.hostname,
        port=parts.port or (465 if implicit_tls else 25),
        implicit_tls=implicit_tls,
        allow_plaintext_auth=parts.scheme == INSECURE_SCHEME,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


class SmtpBackend:
    """SMTP through smtplib: implicit TLS for smtps://, STARTTLS whenever the server offers it, AUTH when given."""

    name = "smtp"

    def __init__(self, url: str, *, ssl_context: ssl.SSLContext | None = None, timeout_s: float = SMTP_TIMEOUT_S):
        self.target = parse_smtp_url(url)
        # Certificates are verified against the system store; tests pass a context trusting their own CA.
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.timeout_s = timeout_s

    def send(self, mail: OutgoingMail) -> str:
        message = build_message(mail)
        target = self.target
        client: smtplib.SMTP | None = None
        try:
            if target.implicit_tls:
                client = smtplib.SMTP_SSL(target.host, target.port, timeout=self.timeout_s, context=self.ssl_context)
            else:
                client = smtplib.SMTP(target.host, target.port, timeout=self.timeout_s)
            client.ehlo()
            encrypted = target.implicit_tls
            if not target.implicit_tls and client.has_extn("starttls"):
                client.starttls(context=self.ssl_context)
                client.ehlo()
                encrypted = True
            if target.username is not None and not encrypted and not target.allow_plaintext_auth:
                # A server (or a man in the middle stripping STARTTLS) that offers no TLS never gets the password.
                raise MailDeliveryError(
                    "SMTP server offered no TLS; refusing to send credentials in clear (use smtps:// or, for a "
                    "trusted relay, smtp+insecure://)"
                )
            if target.username is not None:
                client.login(target.username, target.password or "")
            client.send_message(message)
            client.quit()
        except (smtplib.SMTPException, OSError) as exc:
            # Only the class name: server replies can echo addresses or credentials.
            raise MailDeliveryError(f"SMTP delivery failed ({type(exc).__name__})") from exc
        finally:
            # close(), not quit(): after a failed TLS handshake a QUIT would wait out the whole timeout.
            if client is not None:
                client.close()
        return str(message["Message-ID"])


class SesBackend:
    """Amazon SES through boto3 (``SendRawEmail``, so both parts go exactly as built); honours AWS_ENDPOINT_URL_SES."""

    name = "ses"

    def __init__(self, client: Any = None) -> None:
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3

            self._client = boto3.client("ses")
        return self._client

    def send(self, mail: OutgoingMail) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        message = build_message(mail)
        try:
            answer = self.client.send_raw_email(
                Source=mail.sender, Destinations=[mail.to], RawMessage={"Data": message.as_bytes()}
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "ClientError")
            raise MailDeliveryError(f"SES refused the message ({code})") from exc
        except BotoCoreError as exc:
            raise MailDeliveryError(f"SES could not be reached ({type(exc).__name__})") from exc
        return str(answer["MessageId"])


def build_mail_backend(settings: Settings) -> MailBackend:
    """The backend FRACTAL_MAIL_BACKEND names, configured from settings (connects only when sending)."""
    if settings.mail_backend is MailBackendKind.SES:
        return SesBackend()
    return SmtpBackend(settings.smtp_url)
