"""View decorators that authenticate the caller: users (JWT), admins (JWT with scope admin, or an API key holding
the route's scope), hosts (secret).

Put them directly under the route decorator, above ``@bp.input``: APIFlask validates the body when its ``input``
wrapper runs, so an auth decorator placed below it would let an anonymous caller learn validation details (400)
instead of getting 401. ``functools.wraps`` carries APIFlask's ``_spec`` through, so the OpenAPI spec is unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import structlog
from flask import g, request

from fractal.auth.api_keys import ApiScope, authenticate_api_key, effective_scopes, looks_like_api_key
from fractal.auth.hosts import hash_host_secret
from fractal.auth.tokens import UserClaims
from fractal.errors import ForbiddenError, PaymentRequiredError, UnauthorizedError
from fractal.web import db_session, settings, state

F = TypeVar("F", bound=Callable[..., Any])
ACTIVE_SUBSCRIPTIONS = frozenset({"active", "trialing"})
MAX_CREDENTIAL_LENGTH = 8192


def bearer_credential() -> str:
    """The Bearer credential of this request, or 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, credential = header.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential or len(credential) > MAX_CREDENTIAL_LENGTH:
        raise UnauthorizedError("Send 'Authorization: Bearer <token>'.")
    return credential


def authenticate_user() -> UserClaims:
    """Verify the request's user token and remember the caller on ``g``."""
    credential = bearer_credential()
    if looks_like_api_key(credential):
        raise UnauthorizedError("API keys are accepted on the admin API only.")
    verifier = state().verifier
    if verifier is None:
        raise UnauthorizedError("User tokens cannot be verified: no key is configured.")
    user = verifier.verify(credential)
    g.user = user
    structlog.contextvars.bind_contextvars(user_id=user.user_id)
    return user


def user_required(view: F) -> F:
    """A signed-in user; with FRACTAL_REQUIRE_SUBSCRIPTION, an active subscription too (admins exempt)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        user = authenticate_user()
        if (
            settings().require_subscription
            and not user.is_admin
            and user.subscription_status not in ACTIVE_SUBSCRIPTIONS
        ):
            raise PaymentRequiredError()
        return view(*args, **kwargs)

    return cast(F, wrapper)


def authenticate_admin(scope: ApiScope) -> None:
    """An admin token (every scope), or an API key holding ``scope``; remembers the audit actor on ``g``.

    Raises:
        UnauthorizedError: no, or an invalid, token or key (unknown, tampered, revoked, expired).
        ForbiddenError: a valid user token without the admin scope, or a key without ``scope``.
    """
    credential = bearer_credential()
    if looks_like_api_key(credential):
        caller = authenticate_api_key(db_session(), credential)
        g.api_key = caller
        g.admin_actor = caller.actor
        structlog.contextvars.bind_contextvars(key_id=caller.key_id)  # not api_key*: logs redact such keys
        if scope not in effective_scopes(caller.scopes):
            raise ForbiddenError(f"This needs the {scope} scope.")
        return
    user = authenticate_user()
    if not user.is_admin:
        raise ForbiddenError("This needs the admin scope.")
    g.api_key = None
    g.admin_actor = f"admin:{user.user_id}"


def admin_required(scope: ApiScope) -> Callable[[F], F]:
    """An admin route needing ``scope`` from an API key (admin tokens hold every scope); other callers 401/403.

    The scope is kept on the view as ``required_scope`` (``functools.wraps`` carries it to the outer wrappers), so
    the tests can check every route of the admin app declares the scope its method calls for.
    """

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            authenticate_admin(scope)
            return view(*args, **kwargs)

        wrapper.required_scope = scope  # type: ignore[attr-defined]
        return cast(F, wrapper)

    return decorate


def host_required(view: F) -> F:
    """A host secret; ``g.host_instance_name`` names the one instance it belongs to."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        name = state().host_secrets.instance_name(db_session(), bearer_credential())
        if name is None:
            raise UnauthorizedError()
        g.host_instance_name = name
        structlog.contextvars.bind_contextvars(instance_name=name)
        return view(*args, **kwargs)

    return cast(F, wrapper)


def host_claimed(view: F) -> F:
    """A host secret whose instance the view's own statement re-verifies (the heartbeat).

    ``g.host_instance_name`` is the instance the secret was last known to belong to (a per-process memo, else one
    lookup) and ``g.host_secret_digest`` its digest: the view must pass the digest to a service that checks it
    and the instance's status in the statement that does the work, and that raises UnauthorizedError otherwise.
    A TERMINATED instance's secret (or a replaced one) therefore stops at once, as with ``host_required``, for one
    round trip less; the memo entry is dropped on that 401.
    """

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        directory = state().host_secrets
        digest = hash_host_secret(bearer_credential())
        name = directory.claimed_name(db_session, digest)
        if name is None:
            raise UnauthorizedError()
        g.host_instance_name = name
        g.host_secret_digest = digest
        structlog.contextvars.bind_contextvars(instance_name=name)
        try:
            return view(*args, **kwargs)
        except UnauthorizedError:
            directory.forget(digest)
            raise

    return cast(F, wrapper)


def current_host_secret_digest() -> str:
    digest: str = g.host_secret_digest
    return digest


def current_host_instance_name() -> str:
    name: str = g.host_instance_name
    return name
