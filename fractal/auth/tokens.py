"""User JWT verification: RS256 only, from a PEM key or a cached JWKS endpoint."""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization

from fractal.auth.jwks import JwksKeyNotFoundError, JwksKeySet
from fractal.config import DEV_PUBLIC_KEY_PATH, Settings
from fractal.errors import UnauthorizedError

ALGORITHMS = ["RS256"]
ADMIN_SCOPE = "admin"
# Accept one minute of clock skew between the issuer and us.
LEEWAY_S = 60
# Verified tokens are remembered this long (bounded by their exp) and at most this many at once.
VERIFIED_CACHE_TTL_S = 30.0
VERIFIED_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class UserClaims:
    """Who is calling, as the verified token says."""

    user_id: str
    is_admin: bool
    subscription_status: str | None = None
    claims: dict[str, Any] = field(default_factory=dict, repr=False)


class TokenVerifier(Protocol):
    def verify(self, token: str) -> UserClaims: ...


# The subject is stored as user_id (255 characters) and inside actors ("user:<sub>", "admin:<sub>", 255 characters):
# the longest prefix must still fit.
MAX_SUBJECT_LENGTH = 255 - len("admin:")
TIME_CLAIMS = ("exp", "nbf", "iat")


def is_storable_text(value: str) -> bool:
    """True when PostgreSQL text can hold ``value``: no NUL character and no lone surrogate (not UTF-8)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def claims_to_user(claims: dict[str, Any]) -> UserClaims:
    """Read user id, admin scope and subscription from verified claims; a claim of the wrong type or size is 401."""
    subject = claims.get("sub")
    if (
        not isinstance(subject, str)
        or not subject
        or len(subject) > MAX_SUBJECT_LENGTH
        or not is_storable_text(subject)
    ):
        raise UnauthorizedError("The token has no usable subject.")
    for name in TIME_CLAIMS:
        # PyJWT turns a string "exp" into a number and accepts it; RFC 7519 says NumericDate, a JSON number.
        value = claims.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
        ):
            raise UnauthorizedError(f"The token's {name} claim must be a number.")
    scopes: set[str] = set()
    scope = claims.get("scope")
    if isinstance(scope, str):
        scopes.update(scope.split())
    permissions = claims.get("permissions")
    if isinstance(permissions, list):
        scopes.update(p for p in permissions if isinstance(p, str))
    subscription = claims.get("subscription_status")
    return UserClaims(
        user_id=subject,
        is_admin=ADMIN_SCOPE in scopes,
        subscription_status=subscription if isinstance(subscription, str) else None,
        claims=claims,
    )


class JwtVerifier:
    """Verifies RS256 tokens with a fixed public key or keys fetched (and cached) from a JWKS URL."""

    def __init__(
        self,
        *,
        public_key_pem: str | None = None,
        jwks_url: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        jwks_refresh_cooldown_s: float = 5,
        jwks_lifetime_s: float = 600,
        jwks_timeout_s: float = 3,
    ) -> None:
        if not public_key_pem and not jwks_url:
            raise ValueError("JwtVerifier needs a public key or a JWKS URL")
        # Parse the key once: handing PyJWT a PEM string makes it parse the key on every request.
        self._public_key: Any = None
        if public_key_pem and public_key_pem.lstrip().startswith("{"):
            self._public_key = jwt.algorithms.RSAAlgorithm.from_jwk(public_key_pem)
        elif public_key_pem:
            self._public_key = serialization.load_pem_public_key(_pem_body(public_key_pem).encode())
        # Rotation, removal, one fetch in flight, a negative cache and bounded waits: see fractal.auth.jwks.
        self._jwks = (
            JwksKeySet(
                jwks_url, lifetime_s=jwks_lifetime_s, cooldown_s=jwks_refresh_cooldown_s, timeout_s=jwks_timeout_s
            )
            if jwks_url
            else None
        )
        self._audience = audience
        self._issuer = issuer
        # token → (expiry, caller, JWKS generation it was verified under)
        self._verified: dict[str, tuple[float, UserClaims, int]] = {}
        self._verified_lock = threading.Lock()

    def verify(self, token: str) -> UserClaims:
        cached = self._verified.get(token)
        now = time.time()
        generation = self._jwks.generation if self._jwks is not None else 0
        # A JWKS fetch that removed or replaced a key bumps the generation: nothing verified before it is reused.
        # Past the key set's lifetime nothing cached is reused either: verifying again asks the issuer whether the
        # key is still published, so a removed key stops working within the lifetime even for a token seen before.
        jwks_fresh = self._jwks is None or self._jwks.fresh()
        if cached is not None and cached[0] > now and cached[2] == generation and jwks_fresh:
            return cached[1]
        user = self._verify_uncached(token)
        # Clients send the same token for many requests; remember a verified one briefly (never past exp).
        expires = min(float(user.claims.get("exp", now)), now + VERIFIED_CACHE_TTL_S)
        with self._verified_lock:
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                self._verified.clear()
            self._verified[token] = (expires, user, generation)
        return user

    def _verify_uncached(self, token: str) -> UserClaims:
        try:
            header = _unverified_header(token)
            if header.get("alg") not in ALGORITHMS:
                raise UnauthorizedError("The token must be signed with RS256.")
            key: Any
            kid = header.get("kid")
            if self._jwks is not None and (self._public_key is None or kid):
                if not isinstance(kid, str) or not kid:
                    raise UnauthorizedError("The token names no signing key (kid).")
                try:
                    key = self._jwks.key(kid)
                except JwksKeyNotFoundError as exc:
                    raise UnauthorizedError("The token's signing key is not published by the issuer.") from exc
            else:
                key = self._public_key
            claims = jwt.decode(
                token,
                key=key,
                algorithms=ALGORITHMS,
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_S,
                options={
                    "require": ["sub", "exp"],
                    "verify_aud": self._audience is not None,
                    "verify_iss": self._issuer is not None,
                },
            )
        except UnauthorizedError:
            raise
        except jwt.ExpiredSignatureError as exc:
            raise UnauthorizedError("The token has expired.") from exc
        except jwt.ImmatureSignatureError as exc:
            raise UnauthorizedError("The token is not valid yet.") from exc
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
            raise UnauthorizedError("The token was not issued for this service.") from exc
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError) as exc:  # RecursionError: deeply nested JSON
            # Covers bad signatures, malformed tokens, unknown kids and unreachable JWKS endpoints.
            raise UnauthorizedError("The token is invalid.") from exc
        return claims_to_user(claims)


def _unverified_header(token: str) -> dict[str, Any]:
    """The token's JOSE header, decoded without any check: only to pick the key and refuse other algorithms early.

    jwt.get_unverified_header would validate every segment character by character in Python, which jwt.decode then
    does again; the strict checks of the whole token happen once, in jwt.decode, before any claim is trusted.
    """
    segment = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, TypeError) as exc:  # binascii.Error and JSONDecodeError are ValueErrors
        raise jwt.DecodeError("Invalid header") from exc
    if not isinstance(header, dict):
        raise jwt.DecodeError("Invalid header")
    return header


def _pem_body(pem: str) -> str:
    """The PEM block alone: development keys carry a marker line before it."""
    start = pem.find("-----BEGIN")
    return pem[start:] if start >= 0 else pem


def build_verifier(settings: Settings) -> TokenVerifier | None:
    """The verifier for these settings; in development, the generated dev key when nothing is configured."""
    pem = settings.jwt_public_key.get_secret_value() if settings.jwt_public_key else None
    if pem is None and not settings.jwks_url and settings.env != "production":
        if DEV_PUBLIC_KEY_PATH.exists():
            pem = DEV_PUBLIC_KEY_PATH.read_text()
        else:
            from fractal.auth.dev_keys import ensure_dev_keypair

            pem = ensure_dev_keypair().public_pem
    if pem is None and not settings.jwks_url:
        return None
    return JwtVerifier(
        public_key_pem=pem,
        jwks_url=settings.jwks_url,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        jwks_refresh_cooldown_s=settings.jwks_refresh_cooldown_s,
        jwks_lifetime_s=settings.jwks_lifetime_s,
        jwks_timeout_s=settings.jwks_timeout_s,
    )
