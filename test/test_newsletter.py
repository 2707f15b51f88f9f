"""Newsletter double opt-in over HTTP, with the confirmation mail read back from a loopback SMTP server."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from apiflask import APIFlask
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import select
from sqlalchemy.orm import Session

from fractal.models import NewsletterSubscription, SubscriptionStatus
from fractal.newsletter.tokens import TokenPurpose, sign_token
from test.servers import SmtpServer, free_port

PUBLIC_URL = "https://fractal.example"
SECRET = "newsletter-test-secret"


@pytest.fixture
def client(make_app: Callable[..., APIFlask], smtp_server: SmtpServer) -> Any:
    return make_app("public", smtp_url=smtp_server.url, public_url=PUBLIC_URL, secret_key=SECRET).test_client()


def subscription(db: Session, email: str) -> NewsletterSubscription | None:
    db.expire_all()
    return db.scalars(select(NewsletterSubscription).where(NewsletterSubscription.email == email)).one_or_none()


def links(message: Any) -> dict[str, str]:
    """The confirm and unsubscribe links of a newsletter mail (from the plain-text part)."""
    text = message.get_body(("plain",)).get_content()
    found = re.findall(r"https?://\S+", text)
    return {urlsplit(url).path.rsplit("/", 1)[1]: url for url in found}


def token_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["token"][0]


def subscribe(client: Any, email: str) -> Any:
    return client.post("/newsletter/subscribe", json={"email": email})


def test_subscribe_sends_a_signed_link_that_confirms(client: Any, smtp_server: SmtpServer, db: Session) -> None:
    response = subscribe(client, "Ada.Lovelace@Example.COM")

    assert response.status_code == 202
    assert response.get_json() == {}
    assert subscription(db, "ada.lovelace@example.com").status is SubscriptionStatus.PENDING  # type: ignore[union-attr]
    [message] = smtp_server.inbox.messages
    assert message["To"] == "ada.lovelace@example.com"
    assert message["Subject"] == "Confirm your subscription to the Fractal newsletter"
    html = message.get_body(("html",)).get_content()
    confirm_url = links(message)["confirm"]
    assert confirm_url.startswith(f"{PUBLIC_URL}/newsletter/confirm?token=")
    assert f'href="{confirm_url}"' in html

    answer = client.get(confirm_url.removeprefix(PUBLIC_URL))
    assert answer.status_code == 200
    assert answer.get_json() == {"status": "CONFIRMED"}
    row = subscription(db, "ada.lovelace@example.com")
    assert row is not None and row.status is SubscriptionStatus.CONFIRMED and row.confirmed_at is not None
    assert client.get(confirm_url.removeprefix(PUBLIC_URL)).status_code == 200  # idempotent


def test_the_answer_is_the_same_for_known_and_unknown_addresses(
    client: Any, smtp_server: SmtpServer, db: Session
) -> None:
    first = subscribe(client, "grace@example.com")
    client.get(links(smtp_server.inbox.messages[0])["confirm"].removeprefix(PUBLIC_URL))
    again = subscribe(client, "grace@example.com")
    fresh = subscribe(client, "someone-new@example.com")

    assert first.status_code == again.status_code == fresh.status_code == 202
    assert first.get_data() == again.get_data() == fresh.get_data()
    assert {k for k, _ in first.headers} == {k for k, _ in again.headers} == {k for k, _ in fresh.headers}
    # A confirmed subscriber stays confirmed; asking again only re-sends the (idempotent) link.
    assert subscription(db, "grace@example.com").status is SubscriptionStatus.CONFIRMED  # type: ignore[union-attr]
    assert len(smtp_server.inbox.messages) == 3


def test_unsubscribe_with_the_mailed_token_and_old_confirm_links_die(
    client: Any, smtp_server: SmtpServer, db: Session
) -> None:
    subscribe(client, "linus@example.com")
    mailed = links(smtp_server.inbox.messages[0])
    client.get(mailed["confirm"].removeprefix(PUBLIC_URL))

    response = client.post("/newsletter/unsubscribe", json={"token": token_of(mailed["unsubscribe"])})

    assert response.status_code == 200
    assert response.get_json() == {"status": "UNSUBSCRIBED"}
    row = subscription(db, "linus@example.com")
    assert row is not None and row.status is SubscriptionStatus.UNSUBSCRIBED and row.unsubscribed_at is not None
    stale = client.get(mailed["confirm"].removeprefix(PUBLIC_URL))
    assert stale.status_code == 400 and stale.get_json()["error"] == "INVALID_TOKEN"
    assert client.post("/newsletter/unsubscribe", json={"token": token_of(mailed["unsubscribe"])}).status_code == 200

    subscribe(client, "linus@example.com")  # re-subscribing opens it again, with a fresh link
    assert subscription(db, "linus@example.com").status is SubscriptionStatus.PENDING  # type: ignore[union-attr]
    fresh = links(smtp_server.inbox.messages[1])["confirm"]
    assert client.get(fresh.removeprefix(PUBLIC_URL)).get_json() == {"status": "CONFIRMED"}


def _expired_confirm_token(email: str) -> str:
    class LongAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 3 * 24 * 3600

    return str(
        URLSafeTimedSerializer(SECRET, salt="fractal.newsletter.confirm", signer=LongAgo).dumps({"email": email})
    )


def _bad_tokens() -> dict[str, str]:
    good = sign_token(SECRET, purpose=TokenPurpose.CONFIRM, email="mallory@example.com")
    return {
        "garbage": "not-a-token",
        "empty": "",
        "other key": sign_token("some-other-secret", purpose=TokenPurpose.CONFIRM, email="mallory@example.com"),
        "wrong purpose": sign_token(SECRET, purpose=TokenPurpose.UNSUBSCRIBE, email="mallory@example.com"),
        "tampered": good[:-2] + ("AA" if not good.endswith("AA") else "BB"),
        "expired": _expired_confirm_token("mallory@example.com"),
        "huge": "x" * 5000,
    }


@pytest.mark.parametrize("kind", list(_bad_tokens()))
def test_forged_or_expired_confirm_tokens_are_400_invalid_token(client: Any, db: Session, kind: str) -> None:
    subscribe(client, "mallory@example.com")
    response = client.get("/newsletter/confirm", query_string={"token": _bad_tokens()[kind]})
    assert response.status_code == 400
    assert response.get_json()["error"] == "INVALID_TOKEN"
    assert subscription(db, "mallory@example.com").status is SubscriptionStatus.PENDING  # type: ignore[union-attr]


def test_confirm_without_a_token_is_invalid_token(client: Any) -> None:
    response = client.get("/newsletter/confirm")
    assert response.status_code == 400
    assert response.get_json()["error"] == "INVALID_TOKEN"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"token": sign_token(SECRET, purpose=TokenPurpose.CONFIRM, email="mallory@example.com")}, "INVALID_TOKEN"),
        (
            {"token": sign_token("other", purpose=TokenPurpose.UNSUBSCRIBE, email="mallory@example.com")},
            "INVALID_TOKEN",
        ),
        ({"token": "garbage"}, "INVALID_TOKEN"),
        ({"token": 12}, "VALIDATION_ERROR"),
        ({}, "VALIDATION_ERROR"),
    ],
)
def test_forged_unsubscribe_tokens_are_400(client: Any, db: Session, body: dict[str, Any], code: str) -> None:
    subscribe(client, "mallory@example.com")
    response = client.post("/newsletter/unsubscribe", json=body)
    assert response.status_code == 400
    assert response.get_json()["error"] == code
    assert subscription(db, "mallory@example.com").status is SubscriptionStatus.PENDING  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "email",
    ["", "plainaddress", "@example.com", "ada@", "ada@@example.com", "Ada <ada@example.com>", "a" * 330 + "@x.com", 42],
)
def test_malformed_addresses_are_400_and_nothing_is_sent_or_stored(
    client: Any, smtp_server: SmtpServer, db: Session, email: Any
) -> None:
    response = client.post("/newsletter/subscribe", json={"email": email})
    assert response.status_code == 400
    assert response.get_json()["error"] == "VALIDATION_ERROR"
    assert smtp_server.inbox.messages == []
    assert db.scalars(select(NewsletterSubscription)).all() == []


def test_mail_outage_is_503_and_nothing_is_stored(make_app: Callable[..., APIFlask], db: Session) -> None:
    client = make_app("public", smtp_url=f"smtp://127.0.0.1:{free_port()}", secret_key=SECRET).test_client()
    response = subscribe(client, "ada@example.com")
    assert response.status_code == 503
    assert subscription(db, "ada@example.com") is None


def test_tokens_and_mail_bodies_stay_out_of_the_logs(
    make_app: Callable[..., APIFlask], smtp_server: SmtpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    client = make_app("public", smtp_url=smtp_server.url, public_url=PUBLIC_URL, secret_key=SECRET).test_client()
    subscribe(client, "ada@example.com")
    mailed = links(smtp_server.inbox.messages[0])
    client.get(mailed["confirm"].removeprefix(PUBLIC_URL))
    client.post("/newsletter/unsubscribe", json={"token": token_of(mailed["unsubscribe"])})
    logged = capsys.readouterr().err
    assert '"event": "mail_sent"' in logged
    assert token_of(mailed["confirm"]) not in logged
    assert token_of(mailed["unsubscribe"]) not in logged
    assert "hopefully you" not in logged
    assert SECRET not in logged


def test_subscribe_is_rate_limited_per_address(make_app: Callable[..., APIFlask], smtp_server: SmtpServer) -> None:
    client = make_app("public", smtp_url=smtp_server.url, newsletter_rate_limit="2 per minute").test_client()

    def attempt(n: int, address: str = "192.0.2.10") -> Any:
        return client.post(
            "/newsletter/subscribe", json={"email": f"reader{n}@example.com"}, environ_base={"REMOTE_ADDR": address}
        )

    assert [attempt(n).status_code for n in range(2)] == [202, 202]
    limited = attempt(3)
    assert limited.status_code == 429
    assert limited.json["error"] == "RATE_LIMITED"
    assert int(limited.headers["Retry-After"]) >= 1
    assert len(smtp_server.inbox.messages) == 2  # the refused request sent nothing
    assert attempt(4, address="192.0.2.99").status_code == 202
