"""User-token verification: every bad token kind is 401; admin scope; JWKS with key rotation."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from pytest_httpserver import HTTPServer

from fractal.auth.dev_keys import DevKeyPair, generate_keypair, mint_token
from fractal.auth.tokens import JwtVerifier
from fractal.errors import UnauthorizedError


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _bad_tokens(keypair: DevKeyPair) -> dict[str, str]:
    now = int(time.time())
    other = generate_keypair()
    good_claims = {"sub": "mallory", "exp": now + 600}
    return {
        "expired": mint_token(keypair.private_pem, user_id="u", ttl_s=-3600),
        "not_yet_valid": jwt.encode(
            {"sub": "u", "nbf": now + 3600, "exp": now + 7200}, keypair.private_pem, algorithm="RS256"
        ),
        "bad_signature": mint_token(other.private_pem, user_id="u"),
        "alg_none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(good_claims)}.",
        "hs256_with_public_key": _hs256_with_public_key(keypair.public_pem, good_claims),
        "garbage": "not.a.jwt",
        "no_subject": jwt.encode({"exp": now + 600}, keypair.private_pem, algorithm="RS256"),
        "no_expiry": jwt.encode({"sub": "u"}, keypair.private_pem, algorithm="RS256"),
        "tampered_payload": _tamper(mint_token(keypair.private_pem, user_id="u")),
    }


def _hs256_with_public_key(public_pem: str, claims: dict[str, Any]) -> str:
    # The classic key-confusion attack: sign HS256 using the RSA public key as the HMAC secret.
    import hashlib
    import hmac

    header = _b64({"alg": "HS256", "typ": "JWT"})
    payload = _b64(claims)
    signature = hmac.new(public_pem.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def _tamper(token: str) -> str:
    header, _payload, signature = token.split(".")
    forged = _b64({"sub": "admin", "scope": "admin", "exp": int(time.time()) + 600})
    return f"{header}.{forged}.{signature}"


@pytest.mark.parametrize(
    "kind",
    [
        "expired",
        "not_yet_valid",
        "bad_signature",
        "alg_none",
        "hs256_with_public_key",
        "garbage",
        "no_subject",
        "no_expiry",
        "tampered_payload",
    ],
)
def test_bad_tokens_are_401_on_public_and_admin(
    kind: str, keypair: DevKeyPair, public_client: Any, admin_client: Any
) -> None:
    token = _bad_tokens(keypair)[kind]
    for client, path in ((public_client, "/regions"), (admin_client, "/admin/images")):
        response = client.get(path, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, (kind, path, response.json)
        assert response.json["error"] == "UNAUTHORIZED"


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc"])
def test_missing_or_malformed_authorization_header(header: str, public_client: Any) -> None:
    response = public_client.get("/regions", headers={"Authorization": header} if header else {})
    assert response.status_code == 401
    assert response.json["error"] == "UNAUTHORIZED"


def test_admin_scope_from_scope_or_permissions(
    admin_client: Any, make_token: Callable[..., str], keypair: DevKeyPair
) -> None:
    plain = make_token("alice")
    assert admin_client.get("/admin/images", headers={"Authorization": f"Bearer {plain}"}).status_code == 403
    by_scope = make_token("alice", extra_claims={"scope": "read:things admin"})
    assert admin_client.get("/admin/images", headers={"Authorization": f"Bearer {by_scope}"}).status_code == 200
    by_permissions = make_token("alice", extra_claims={"permissions": ["admin"]})
    response = admin_client.get("/admin/images", headers={"Authorization": f"Bearer {by_permissions}"})
    assert response.status_code == 200
    forbidden = admin_client.get("/admin/images", headers={"Authorization": f"Bearer {plain}"})
    assert forbidden.json["error"] == "FORBIDDEN"


def test_audience_and_issuer_are_checked_when_set(make_app: Callable[..., Any], make_token: Callable[..., str]) -> None:
    client = make_app("public", jwt_audience="fractal-api", jwt_issuer="https://auth.example/").test_client()
    right = make_token("u", audience="fractal-api", issuer="https://auth.example/")
    assert client.get("/regions", headers={"Authorization": f"Bearer {right}"}).status_code == 200
    for token in (
        make_token("u", audience="someone-else", issuer="https://auth.example/"),
        make_token("u", audience="fractal-api", issuer="https://evil.example/"),
        make_token("u"),
    ):
        response = client.get("/regions", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401
        assert response.json["error"] == "UNAUTHORIZED"


def _jwk(pair: DevKeyPair, kid: str) -> dict[str, Any]:
    jwk = json.loads(
        jwt.algorithms.RSAAlgorithm.to_jwk(
            jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).prepare_key(pair.public_pem)
        )
    )
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


def test_jwks_keys_are_cached_and_refetched_on_unknown_kid(httpserver: HTTPServer) -> None:
    first, second = generate_keypair(), generate_keypair()
    keys = {"keys": [_jwk(first, "k1")]}
    httpserver.expect_request("/.well-known/jwks.json").respond_with_handler(
        lambda _request: __import__("werkzeug").Response(json.dumps(keys), content_type="application/json")
    )
    verifier = JwtVerifier(jwks_url=httpserver.url_for("/.well-known/jwks.json"), jwks_refresh_cooldown_s=0)

    assert verifier.verify(mint_token(first.private_pem, user_id="a", kid="k1")).user_id == "a"
    assert verifier.verify(mint_token(first.private_pem, user_id="b", kid="k1")).user_id == "b"
    fetched_once = len(httpserver.log)

    # The issuer rotates keys: a token with a new kid triggers one refetch and then verifies.
    keys["keys"].append(_jwk(second, "k2"))
    assert verifier.verify(mint_token(second.private_pem, user_id="c", kid="k2")).user_id == "c"
    assert len(httpserver.log) == fetched_once + 1

    with pytest.raises(UnauthorizedError):
        verifier.verify(mint_token(generate_keypair().private_pem, user_id="d", kid="unknown"))
    with pytest.raises(UnauthorizedError):
        verifier.verify(mint_token(second.private_pem, user_id="e", kid="k1"))  # right kid, wrong key


def test_unreachable_jwks_is_401_not_500() -> None:
    verifier = JwtVerifier(jwks_url="http://127.0.0.1:9/jwks.json")
    with pytest.raises(UnauthorizedError):
        verifier.verify(mint_token(generate_keypair().private_pem, user_id="u", kid="k1"))
