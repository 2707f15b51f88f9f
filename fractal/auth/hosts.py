"""Host secrets: 32 random bytes handed to a host once; only a SHA-256 digest is stored."""

from __future__ import annotations

import hashlib
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


class HostSecretDirectory:
    """secret → instance name, remembering hits in this process.

    A secret's instance never changes (the digest is unique and instance rows are never deleted, only marked
    TERMINATED), so a remembered hit can't go stale; misses are never remembered, so a freshly registered
    host is found at once. Bounded: when full it starts over.
    """

    def __init__(self, *, max_entries: int = 100_000) -> None:
        self._names: dict[str, str] = {}
        self._max_entries = max_entries

    def instance_name(self, session: Session, secret: str) -> str | None:
        digest = hash_host_secret(secret)
        name = self._names.get(digest)
        if name is None:
            name = instance_name_for_secret_hash(session, digest)
            if name is not None:
                if len(self._names) >= self._max_entries:
                    self._names.clear()
                self._names[digest] = name
        return name


def instance_name_for_secret_hash(session: Session, digest: str) -> str | None:
    """The instance whose secret has this digest, or None (one indexed lookup: the digest is unique)."""
    return session.execute(
        select(Instance.instance_name).where(Instance.host_secret_hash == digest)
    ).scalar_one_or_none()
