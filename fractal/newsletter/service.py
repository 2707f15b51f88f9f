"""Newsletter subscriptions: double opt-in with signed links, and no way to learn whether an address is known."""

from __future__ import annotations

from urllib.parse import urlencode

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fractal.clock import utcnow
from fractal.database import is_postgres
from fractal.errors import InvalidTokenError
from fractal.mail.backends import MailBackend
from fractal.mail.service import deliver_mail
from fractal.models import NewsletterSubscription, SubscriptionStatus
from fractal.newsletter.tokens import MAX_AGE_S, TokenPurpose, read_token, sign_token

CONFIRM_TEMPLATE = "newsletter_confirm"


def normalise_email(email: str) -> str:
    """One row per mailbox whatever the capitalisation it was typed with."""
    return email.strip().lower()


def newsletter_link(public_url: str, path: str, token: str) -> str:
    return f"{public_url.rstrip('/')}{path}?{urlencode({'token': token})}"


def subscribe_newsletter(
    session: Session,
    *,
    email: str,
    backend: MailBackend,
    sender: str,
    public_url: str,
    secret_key: str,
) -> None:
    """Ask ``email`` to confirm a subscription: one unit of work.

    Every address gets the same treatment and the caller the same answer (no enumeration): the row is
    created or re-opened as PENDING (a CONFIRMED one stays confirmed) and the confirmation mail is sent.

    Raises:
        ServiceUnavailableError: the mail could not be delivered (nothing is stored then).
    """
    email = normalise_email(email)
    # Two concurrent subscribes of one address must not collide on the primary key (a 500): insert if
    # absent, then lock the row so the status change and the mail are serialised per address.
    dialect = postgresql if is_postgres(session) else sqlite
    session.execute(
        dialect.insert(NewsletterSubscription)
        .values(email=email, status=SubscriptionStatus.PENDING)
        .on_conflict_do_nothing(index_elements=["email"])
    )
    subscription = session.execute(
        select(NewsletterSubscription).where(NewsletterSubscription.email == email).with_for_update()
    ).scalar_one()
    if subscription.status is SubscriptionStatus.UNSUBSCRIBED:
        subscription.status = SubscriptionStatus.PENDING
        subscription.confirmed_at = None
    confirm = sign_token(secret_key, purpose=TokenPurpose.CONFIRM, email=email)
    unsubscribe = sign_token(secret_key, purpose=TokenPurpose.UNSUBSCRIBE, email=email)
    deliver_mail(
        session,
        backend=backend,
        sender=sender,
        template=CONFIRM_TEMPLATE,
        to=email,
        args={
            "confirm_url": newsletter_link(public_url, "/newsletter/confirm", confirm),
            "unsubscribe_url": newsletter_link(public_url, "/newsletter/unsubscribe", unsubscribe),
            "expires_in_hours": str(MAX_AGE_S[TokenPurpose.CONFIRM] // 3600),
        },
        actor="newsletter",
    )
    session.commit()


def confirm_newsletter(session: Session, *, token: str, secret_key: str) -> NewsletterSubscription:
    """Confirm the subscription a confirmation token names (idempotent).

    Raises:
        InvalidTokenError: bad or expired token, no such subscription, or unsubscribed since the link was sent.
    """
    email, _signed_at = read_token(secret_key, purpose=TokenPurpose.CONFIRM, token=token)
    subscription = session.execute(
        select(NewsletterSubscription).where(NewsletterSubscription.email == email).with_for_update()
    ).scalar_one_or_none()
    # Subscribing again re-opens the row as PENDING, so an UNSUBSCRIBED row means every confirmation
    # link in circulation predates the unsubscribe: an old link must not re-subscribe anyone.
    if subscription is None or subscription.status is SubscriptionStatus.UNSUBSCRIBED:
        session.rollback()
        raise InvalidTokenError()
    if subscription.status is SubscriptionStatus.PENDING:
        subscription.status = SubscriptionStatus.CONFIRMED
        subscription.confirmed_at = utcnow()
    session.commit()
    return subscription


def unsubscribe_newsletter(session: Session, *, token: str, secret_key: str) -> None:
    """Unsubscribe the address an unsubscribe token names (idempotent; unknown addresses are a no-op).

    Raises:
        InvalidTokenError: bad, expired or wrong-purpose token.
    """
    email, _signed_at = read_token(secret_key, purpose=TokenPurpose.UNSUBSCRIBE, token=token)
    subscription = session.execute(
        select(NewsletterSubscription).where(NewsletterSubscription.email == email).with_for_update()
    ).scalar_one_or_none()
    if subscription is not None and subscription.status is not SubscriptionStatus.UNSUBSCRIBED:
        subscription.status = SubscriptionStatus.UNSUBSCRIBED
        subscription.unsubscribed_at = utcnow()
    session.commit()
