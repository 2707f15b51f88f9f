"""Signed, expiring newsletter tokens (itsdangerous), salted per purpose so one kind never passes for another."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from itsdangerous import BadData, URLSafeTimedSerializer

from fractal.errors import InvalidTokenError

MAX_TOKEN_LENGTH = 1024


class TokenPurpose(enum.StrEnum):
    CONFIRM = "newsletter.confirm"
    UNSUBSCRIBE = "newsletter.unsubscribe"


# A confirmation link is short-lived; the unsubscribe link in a mail must keep working for a long time.
MAX_AGE_S: dict[TokenPurpose, int] = {
    TokenPurpose.CONFIRM: 48 * 3600,
    TokenPurpose.UNSUBSCRIBE: 365 * 24 * 3600,
}


def _serializer(secret_key: str, purpose: TokenPurpose) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret_key, salt=f"fractal.{purpose.value}")


def sign_token(secret_key: str, *, purpose: TokenPurpose, email: str) -> str:
    """A URL-safe token binding ``email`` to ``purpose``, stamped with the time of signing."""
    return str(_serializer(secret_key, purpose).dumps({"email": email}))


def read_token(secret_key: str, *, purpose: TokenPurpose, token: str) -> tuple[str, datetime]:
    """The address a valid, unexpired token names and when it was signed.

    Raises:
        InvalidTokenError: forged, tampered, expired, of another purpose, or malformed.
    """
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidTokenError()
    try:
        payload, signed_at = _serializer(secret_key, purpose).loads(
            token, max_age=MAX_AGE_S[purpose], return_timestamp=True
        )
    except BadData as exc:
        raise InvalidTokenError() from exc
    email = payload.get("email") if isinstance(payload, dict) else None
    if not isinstance(email, str) or not email:
        raise InvalidTokenError()
    if signed_at.tzinfo is None:
        signed_at = signed_at.replace(tzinfo=UTC)
    return email, signed_at
