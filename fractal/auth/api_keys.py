"""API keys for the admin API: ``fk_<id>_<secret>``, shown once, stored as a SHA-256 digest, scoped, revocable.

A key is 256 bits of randomness, so a fast hash is right (as for host secrets): nothing to brute-force, and the
lookup is by ``id``, the key's public part, with the digest compared in constant time. The ``fk_`` prefix tells a
key from a JWT (which starts ``eyJ``) before anything is parsed.

Scopes: ``admin:read`` (every GET of the admin API), ``admin:write`` (every other admin route; it implies
``images:write``), ``images:write`` (publishing and deactivating images only: ``PUT /admin/images/...``). Nothing
else implies anything: a deploy pipeline that publishes and then watches capacity holds
``images:write admin:read``. A key never creates a key with a scope it does not hold itself. Admin JWTs hold every
scope.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from fractal.clock import database_now, db_now
from fractal.errors import ForbiddenError, NotFoundError, UnauthorizedError, ValidationError
from fractal.events import EventKind, record_event
from fractal.models import ApiKey
from fractal.pagination import Page, SortKey, after_key, decode_cursor, fetch_page

KEY_PREFIX = "fk_"
KEY_ID_BYTES = 6  # 12 hex characters: the public lookup part
KEY_SECRET_BYTES = 32
_KEY_PATTERN = re.compile(r"^fk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
# last_used_at is written at most this often per key, so a busy pipeline is not one write per request.
LAST_USED_RESOLUTION_S = 60.0


class ApiScope(enum.StrEnum):
    ADMIN_READ = "admin:read"
    ADMIN_WRITE = "admin:write"
    IMAGES_WRITE = "images:write"


ALL_SCOPES = frozenset(ApiScope)
IMPLIED_SCOPES: dict[ApiScope, frozenset[ApiScope]] = {ApiScope.ADMIN_WRITE: frozenset({ApiScope.IMAGES_WRITE})}


def effective_scopes(scopes: frozenset[ApiScope] | set[ApiScope]) -> frozenset[ApiScope]:
    """The scopes held, with what they imply."""
    held = set(scopes)
    for scope in scopes:
        held |= IMPLIED_SCOPES.get(scope, frozenset())
    return frozenset(held)


def looks_like_api_key(credential: str) -> bool:
    return credential.startswith(KEY_PREFIX)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeyCaller:
    """An authenticated key: who it is (for audit actors) and what it may do."""

    key_id: str
    name: str
    scopes: frozenset[ApiScope]

    @property
    def actor(self) -> str:
        return f"api_key:{self.key_id}"


@dataclass(frozen=True)
class ApiKeyView:
    id: str
    name: str
    scopes: list[str]
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, row: ApiKey) -> ApiKeyView:
        return cls(
            id=row.id,
            name=row.name,
            scopes=list(row.scopes),
            created_at=row.created_at,
            created_by=row.created_by,
            expires_at=row.expires_at,
            revoked_at=row.revoked_at,
            last_used_at=row.last_used_at,
        )


@dataclass(frozen=True)
class CreatedApiKey:
    view: ApiKeyView
    key: str


def create_api_key(
    session: Session,
    *,
    name: str,
    scopes: list[ApiScope],
    expires_at: datetime | None,
    actor: str,
    caller_scopes: frozenset[ApiScope] | None = None,
) -> CreatedApiKey:
    """A new key (answered once; only its digest is stored) and its ``api_key.created`` event. Commits.

    ``caller_scopes`` are the creating key's effective scopes (None: an admin token, which holds all).

    Raises:
        ValidationError: no scopes, or an expiry not in the future (on the database's clock).
        ForbiddenError: a key asked for a scope it does not hold.
    """
    wanted = sorted(set(scopes))
    if not wanted:
        raise ValidationError("A key needs at least one scope.", details={"json": {"scopes": ["must not be empty"]}})
    if caller_scopes is not None and not set(wanted) <= caller_scopes:
        missing = sorted(set(wanted) - caller_scopes)
        raise ForbiddenError(f"A key cannot grant scopes it does not hold: {', '.join(missing)}.")
    if expires_at is not None and expires_at <= database_now(session):
        raise ValidationError(
            "The expiry must be in the future.", details={"json": {"expires_at": ["must be in the future"]}}
        )
    key_id = secrets.token_hex(KEY_ID_BYTES)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(KEY_SECRET_BYTES)}"
    row = ApiKey(
        id=key_id,
        name=name,
        digest=key_digest(key),
        scopes=[str(scope) for scope in wanted],
        created_by=actor,
        expires_at=expires_at,
    )
    session.add(row)
    record_event(
        session,
        kind=EventKind.API_KEY_CREATED,
        actor=actor,
        detail={"key_id": key_id, "name": name, "scopes": row.scopes, "expires_at": _iso(expires_at)},
    )
    session.flush()
    session.refresh(row)
    view = ApiKeyView.of(row)
    session.commit()
    return CreatedApiKey(view=view, key=key)


API_KEYS_LIST = "api_keys"
API_KEY_ORDER = (SortKey(ApiKey.name), SortKey(ApiKey.id))


def list_api_keys(session: Session, *, limit: int = 500, cursor: str | None = None) -> Page[ApiKeyView]:
    """One page of keys (revoked ones too), by name then id. Ends its read transaction.

    Raises:
        ValidationError: ``cursor`` is not a cursor of this list.
    """
    query = select(ApiKey)
    if cursor is not None:
        key = decode_cursor(cursor, list_name=API_KEYS_LIST, key_types=(str, str))
        query = query.where(after_key(API_KEY_ORDER, key))
    page = fetch_page(
        session,
        query,
        keys=API_KEY_ORDER,
        limit=limit,
        list_name=API_KEYS_LIST,
        convert=lambda row: ApiKeyView.of(row[0]),
        key_of=lambda view: (view.name, view.id),
    )
    session.commit()
    return page


def revoke_api_key(session: Session, *, key_id: str, actor: str) -> ApiKeyView:
    """Revoke a key from now on (the database's clock); revoking a revoked key changes nothing. Commits.

    Raises:
        NotFoundError: no such key.
    """
    revoked = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=db_now())
        .returning(ApiKey.id)
    ).scalar_one_or_none()
    if revoked is not None:
        record_event(session, kind=EventKind.API_KEY_REVOKED, actor=actor, detail={"key_id": key_id})
    row = session.get(ApiKey, key_id, populate_existing=True)
    if row is None:
        session.rollback()
        raise NotFoundError("No such API key.")
    view = ApiKeyView.of(row)
    session.commit()
    return view


def authenticate_api_key(session: Session, credential: str) -> ApiKeyCaller:
    """The caller a key names, or 401: unknown, malformed, tampered, revoked or expired (measured on the database's
    clock). A revoked or expired key that is otherwise right is an ``api_key.refused`` event. Refreshes
    ``last_used_at`` at most once a minute. Commits what it writes.

    Raises:
        UnauthorizedError
    """
    match = _KEY_PATTERN.match(credential)
    if match is None:
        raise UnauthorizedError("The API key is not valid.")
    key_id = match.group(1)
    row = session.execute(select(ApiKey, db_now()).where(ApiKey.id == key_id)).first()
    # Compare against a digest even for an unknown id, so timing says nothing about which ids exist.
    stored = row[0].digest if row is not None else "0" * 64
    if not hmac.compare_digest(stored, key_digest(credential)) or row is None:
        session.rollback()
        raise UnauthorizedError("The API key is not valid.")
    api_key, now = row[0], row[1]
    reason = (
        "revoked"
        if api_key.revoked_at is not None
        else "expired"
        if api_key.expires_at is not None and api_key.expires_at <= now
        else None
    )
    if reason is not None:
        record_event(
            session,
            kind=EventKind.API_KEY_REFUSED,
            actor=f"api_key:{key_id}",
            detail={"key_id": key_id, "name": api_key.name, "reason": reason},
        )
        session.commit()
        raise UnauthorizedError(f"The API key is {reason}.")
    caller = ApiKeyCaller(
        key_id=key_id,
        name=api_key.name,
        scopes=frozenset(ApiScope(scope) for scope in api_key.scopes if scope in ALL_SCOPES),
    )
    if api_key.last_used_at is None or api_key.last_used_at <= now - timedelta(seconds=LAST_USED_RESOLUTION_S):
        # Guarded, so concurrent requests of one key write it once; the view's own transaction starts clean.
        session.execute(
            update(ApiKey)
            .where(
                ApiKey.id == key_id,
                or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= db_now(-LAST_USED_RESOLUTION_S)),
            )
            .values(last_used_at=db_now())
        )
    session.commit()
    return caller


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
