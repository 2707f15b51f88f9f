"""Request-scoped plumbing for views: the per-request session, settings and the authenticated caller.

Only views and decorators import this module; services take what they need as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flask import current_app, g
from sqlalchemy.orm import Session

from fractal.auth.hosts import HostSecretDirectory
from fractal.auth.tokens import TokenVerifier, UserClaims
from fractal.config import Settings
from fractal.database import SessionFactory

EXTENSION_KEY = "fractal"


@dataclass
class FractalState:
    """What the factory built for one app; stored in ``app.extensions["fractal"]``."""

    settings: Settings
    session_factory: SessionFactory
    verifier: TokenVerifier | None
    host_secrets: HostSecretDirectory = field(default_factory=HostSecretDirectory)
    services: dict[str, Any] = field(default_factory=dict)


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


def close_db_session(_exc: BaseException | None = None) -> None:
    session: Session | None = g.pop("db_session", None)
    if session is not None:
        session.close()


def current_user() -> UserClaims:
    user: UserClaims = g.user
    return user
