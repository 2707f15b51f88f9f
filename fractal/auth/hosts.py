"""Host secrets: 32 random bytes handed to a host once; only a SHA-256 digest is stored."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from fractal.models import Instance, InstanceStatus

HOST_SECRET_BYTES = 32


def generate_host_secret() -> str:
    """A new URL-safe secret with 256 bits of entropy."""
    return secrets.token_urlsafe(HOST_SECRET_BYTES)


def hash_host_secret(secret: str) -> str:
    """The stored form. A fast hash is right here: the secret is random, not a guessable password,
    and the digest is also the lookup key from secret to instance."""
    return hashlib.sha256(secret.encode()).hexdigest()


class HostSecretDirectory:
    """secret → instance name, for instances whose secret still works (every status but TERMINATED).

    ``instance_name`` looks the secret up on every call (one indexed read by the unique digest): a secret must stop
    working the moment its instance is TERMINATED, so a remembered answer could go stale.

    ``claimed_name`` may answer from a per-process memo, for routes whose own statement re-checks the secret's
    digest and the instance's status in the same round trip (the heartbeat): a stale memo can then only name the
    instance the caller would be refused for, and the route calls ``forget``.
    """

    MEMO_LIMIT = 100_000

    def __init__(self) -> None:
        self._memo: dict[str, str] = {}

    def instance_name(self, session: Session, secret: str) -> str | None:
        return instance_name_for_secret_hash(session, hash_host_secret(secret))

    def claimed_name(self, session: Callable[[], Session], digest: str) -> str | None:
        """The instance this secret digest was last found to belong to; looked up (and remembered) when unknown.

        ``session`` is called only for the lookup: a remembered digest needs no database session.
        """
        name = self._memo.get(digest)
        if name is not None:
            return name
        name = instance_name_for_secret_hash(session(), digest)
        if name is not None:
            self.remember(digest, name)
        return name

    def remember(self, digest: str, name: str) -> None:
        if len(self._memo) >= self.MEMO_LIMIT:
            self._memo.clear()  # bounded: a fleet larger than the memo only costs lookups
        self._memo[digest] = name

    def forget(self, digest: str) -> None:
        self._memo.pop(digest, None)


def instance_name_for_secret_hash(session: Session, digest: str) -> str | None:
    """The instance whose secret has this digest, or None (also when it is TERMINATED: its host is gone, so
    whoever still holds the secret is not that host)."""
    return session.execute(
        select(Instance.instance_name).where(
            Instance.host_secret_hash == digest, Instance.status != InstanceStatus.TERMINATED
        )
    ).scalar_one_or_none()
