"""Host secrets: 32 random bytes handed to a host once; only a SHA-256 digest is stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from fractal.models import Instance

HOST_SECRET_BYTES = 32


def generate_host_secret() -> str:
    """A new URL-safe secret with 256 bits of entropy."""
    return secrets.token_urlsafe(HOST_SECRET_BYTES)


def hash_host_secret(secret: str) -> str:
    """The stored form. A fast hash is right here: the secret is random, not a guessable password,
    and the digest is also the lookup key from secret to instance."""
    return hashlib.sha256(secret.encode()).hexdigest()


def host_secret_matches(secret: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented secret with a stored digest."""
    return hmac.compare_digest(hash_host_secret(secret), stored_hash)


def instance_name_for_secret(session: Session, secret: str) -> str | None:
    """The instance this secret belongs to, or None. The digest is unique, so one indexed lookup."""
    return session.execute(
        select(Instance.instance_name).where(Instance.host_secret_hash == hash_host_secret(secret))
    ).scalar_one_or_none()
