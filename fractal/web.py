"""Request-scoped plumbing for views: the per-request session, settings and the authenticated caller.

Only views and decorators import this module; services take what they need as arguments.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flask import current_app, g
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from fractal.auth.api_keys import ApiKeyCaller, ApiScope, effective_scopes
from fractal.auth.hosts import HostSecretDirectory
from fractal.auth.tokens import TokenVerifier, UserClaims
from fractal.cache import DataCache
from fractal.cloud.base import CloudProvider
from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.errors import NotFoundError
from fractal.nudge import Nudge

if TYPE_CHECKING:
    from fractal.mail.backends import MailBackend
    from fractal.redis_client import RedisClient

EXTENSION_KEY = "fractal"


@dataclass
class FractalState:
    """What the factory built for one app; stored in ``app.extensions["fractal"]``."""

    settings: Settings
    session_factory: SessionFactory
    verifier: TokenVerifier | None
    cloud: CloudProvider  # the scaler's cloud (admin reconcile, `flask scaler`); building it connects to nothing
    cache: DataCache
    nudge: Nudge  # wakes the scaler when assign runs out of room
    engine: Engine | None = None  # None when the caller injected its own session factory (tests)
    redis: RedisClient | None = None  # /readyz pings it (every master of a cluster)
    host_secrets: HostSecretDirectory = field(default_factory=HostSecretDirectory)
    # Built on first use by the routes that need them (so an app that never mails builds no mail client).
    mail_backend: MailBackend | None = None
    s3: Any = None


def state() -> FractalState:
    result: FractalState = current_app.extensions[EXTENSION_KEY]
    return result


def settings() -> Settings:
    return state().settings


def db_session() -> Session:
    """The request's session, opened on first use and closed in teardown."""
    session: Session | None = g.get("db_session")
    if session is None:
        session = state().session_factory()
        g.db_session = session
    return session


def db_engine_or_session() -> Engine | Session:
    """The engine the request's sessions are bound to (every app the factory builds for itself), for a route whose
    service runs its work in a transaction of its own without an ORM session; else (sessions bound to a
    connection: the tests' outer transaction) the request's session."""
    bind = state().session_factory.kw.get("bind")
    return bind if isinstance(bind, Engine) else db_session()


def close_db_session(_exc: BaseException | None = None) -> None:
    # The app context's namespace fetched once (werkzeug's documented way behind a proxy) and its attribute popped
    # there: g.pop went through the proxy's attribute lookup and _AppCtxGlobals.pop on every request, most of which
    # never open a session.
    session: Session | None = vars(g._get_current_object()).pop("db_session", None)
    if session is not None:
        session.close()


def current_user() -> UserClaims:
    user: UserClaims = g.user
    return user


def current_admin_actor() -> str:
    """Who called this admin route, for audit events: ``admin:<sub>`` (a token) or ``api_key:<id>``."""
    actor: str = g.admin_actor
    return actor


def current_api_key_scopes() -> frozenset[ApiScope] | None:
    """The calling API key's effective scopes; None for an admin token (which holds every scope)."""
    caller: ApiKeyCaller | None = g.get("api_key")
    return effective_scopes(caller.scopes) if caller is not None else None


def parse_mandelbox_id(raw: str) -> uuid.UUID:
    """A mandelbox id from a URL path; one that is not a UUID cannot name a mandelbox: 404, like any unknown id."""
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise NotFoundError("No such mandelbox.") from exc


def mail_backend() -> MailBackend:
    """This app's mail backend, built from settings on first use (an app that never mails builds none)."""
    from fractal.mail.backends import build_mail_backend

    app_state = state()
    if app_state.mail_backend is None:
        app_state.mail_backend = build_mail_backend(app_state.settings)
    return app_state.mail_backend
