"""The auth attack matrix, driven by each app's own OpenAPI spec so that a new route is covered the day it is added.

test/test_auth.py holds the bad user-token kinds (expired, nbf, bad signature, aud/iss, alg none, HS256 with the
public key, garbage, tampered) and JWKS rotation; test/test_host_bad_input.py and test/test_log_uploads.py hold
the hand-picked host cases. Here: every secured operation of every app against every wrong kind of credential,
credentials checked before the body or query is validated, admin routes absent elsewhere, ownership (404) for users
and hosts, an unknown JWKS ``kid`` over HTTP, and the body-size and field-length limits of every JSON body.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import werkzeug
from apiflask import APIFlask
from pytest_httpserver import HTTPServer
from sqlalchemy.orm import Session

from fractal.auth.dev_keys import generate_keypair, mint_token
from fractal.models import Mandelbox, MandelboxStatus
from test.factories import Factories
from test.test_auth import _jwk

KINDS = ("public", "admin", "host")
Headers = Callable[..., dict[str, str]]


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def operations(
    client: Any, *, secured: bool | None = None, spec: dict[str, Any] | None = None
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(method, concrete path, operation) for every operation in the app's spec; path parameters get dummy ids."""
    spec = spec or client.get("/openapi.json").json
    for path, item in spec["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", lambda m: str(uuid.uuid4()) if "id" in m.group(0) else "x", path)
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            if secured is not None and bool(operation.get("security")) != secured:
                continue
            operation["x-path"] = path
            yield method, concrete, operation


def call(client: Any, method: str, path: str, *, headers: dict[str, str] | None = None, body: Any = None) -> Any:
    if body is None and method in {"post", "put", "patch"}:
        body = {}
    return client.open(path, method=method.upper(), json=body, headers=headers or {})


def assert_401(response: Any, label: str) -> None:
    assert response.status_code == 401, (label, response.status_code, response.get_json())
    assert response.get_json()["error"] == "UNAUTHORIZED", label


@pytest.fixture
def clients(make_app: Callable[..., APIFlask]) -> dict[str, Any]:
    return {kind: make_app(kind).test_client() for kind in KINDS}


@pytest.fixture
def host_secret(factories: Factories) -> str:
    factories.image()
    _instance, secret = factories.instance()
    return secret


def test_every_secured_operation_is_declared_and_there_are_many(clients: dict[str, Any]) -> None:
    counts = {kind: len(list(operations(client, secured=True))) for kind, client in clients.items()}
    assert counts["public"] >= 5 and counts["admin"] >= 12 and counts["host"] >= 5, counts


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_credentials_are_401_on_every_secured_operation(
    kind: str, clients: dict[str, Any], host_secret: str, make_token: Callable[..., str], keypair: Any
) -> None:
    client = clients[kind]
    expired = mint_token(keypair.private_pem, user_id="u", ttl_s=-60)
    wrong: dict[str, dict[str, str]] = {
        "none": {},
        "not bearer": {"Authorization": f"Basic {host_secret}"},
        "expired token": bearer(expired),
        "garbage": bearer("x" * 43),
    }
    if kind == "host":
        # A user's token, even an admin's, is never a host credential.
        wrong |= {"user token": bearer(make_token("u")), "admin token": bearer(make_token("op", admin=True))}
    else:
        wrong |= {"host secret": bearer(host_secret)}
    checked = 0
    for method, path, _operation in operations(client, secured=True):
        for name, headers in wrong.items():
            assert_401(call(client, method, path, headers=headers), f"{kind} {method} {path} with {name}")
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("kind", KINDS)
def test_credentials_are_checked_before_the_body_or_query(kind: str, clients: dict[str, Any]) -> None:
    """An anonymous caller learns nothing about validation: an invalid body or query is still 401, not 400."""
    client = clients[kind]
    checked = 0
    for method, path, operation in operations(client, secured=True):
        has_query = any(p.get("in") == "query" for p in operation.get("parameters", []))
        if "requestBody" not in operation and not has_query:
            continue
        query = "?limit=-5&status=NOPE&region=" + "x" * 300 if has_query else ""
        for body in ({"regions": 7, "status": 3, "instance_name": None}, [1, 2], "not an object"):
            response = client.open(path + query, method=method.upper(), json=body)
            assert_401(response, f"{kind} {method} {path} body={body!r}")
        malformed = client.open(path + query, method=method.upper(), data="{not json", content_type="application/json")
        assert_401(malformed, f"{kind} {method} {path} malformed JSON")
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("kind", ["public", "host"])
def test_admin_routes_are_absent_from_the_public_and_host_apps(
    kind: str, clients: dict[str, Any], admin_headers: dict[str, str]
) -> None:
    admin_ops = list(operations(clients["admin"]))
    admin_only = [(m, p) for m, p, _ in admin_ops if p.startswith("/admin")]
    assert len(admin_only) >= 12
    for method, path in admin_only:
        response = call(clients[kind], method, path, headers=admin_headers)
        assert response.status_code == 404, (kind, method, path, response.status_code)
        assert response.get_json()["error"] == "NOT_FOUND"


def test_host_routes_are_absent_from_the_public_and_admin_apps(clients: dict[str, Any], host_secret: str) -> None:
    for method, path, _ in operations(clients["host"]):
        if not path.startswith("/host"):
            continue
        for kind in ("public", "admin"):
            response = call(clients[kind], method, path, headers=bearer(host_secret))
            assert response.status_code == 404, (kind, method, path)


def test_unknown_kid_from_a_jwks_issuer_is_401_over_http(
    httpserver: HTTPServer, make_app: Callable[..., APIFlask], factories: Factories
) -> None:
    known = generate_keypair()
    jwks = {"keys": [_jwk(known, "k1")]}
    httpserver.expect_request("/.well-known/jwks.json").respond_with_handler(
        lambda _request: werkzeug.Response(json.dumps(jwks), content_type="application/json")
    )
    client = make_app(
        "public", jwt_public_key=None, jwks_url=httpserver.url_for("/.well-known/jwks.json")
    ).test_client()
    good = mint_token(known.private_pem, user_id="a", kid="k1")
    assert client.get("/regions", headers=bearer(good)).status_code == 200
    for token in (
        mint_token(generate_keypair().private_pem, user_id="a", kid="k-unknown"),  # a kid the issuer never had
        mint_token(known.private_pem, user_id="a", kid="k-unknown"),  # right key, kid not published
        mint_token(known.private_pem, user_id="a"),  # no kid at all
    ):
        assert_401(client.get("/regions", headers=bearer(token)), "jwks")
        assign = client.post("/mandelbox/assign", json={"regions": ["us-east-1"], "client_commit_hash": "abc123"})
        assert_401(assign, "jwks assign without token")


# --- ownership ------------------------------------------------------------------------------------------------


def test_another_users_mandelbox_is_invisible(
    clients: dict[str, Any], host_secret: str, user_headers: Headers, db: Session, aws_env: str
) -> None:
    owner = clients["public"].post(
        "/mandelbox/assign", json={"regions": ["us-east-1"], "client_commit_hash": "abc123"}, headers=user_headers("a")
    )
    assert owner.status_code == 201
    mandelbox_id = owner.get_json()["mandelbox_id"]
    path = f"/mandelbox/{mandelbox_id}"
    stranger = user_headers("b")
    for response in (
        clients["public"].get(path, headers=stranger),
        clients["public"].delete(path, headers=stranger),
        clients["public"].put(f"{path}/logs", data=b"not yours", headers=stranger),
    ):
        assert response.status_code == 404
        assert response.get_json() == clients["public"].get(f"/mandelbox/{uuid.uuid4()}", headers=stranger).get_json()
    box = db.get(Mandelbox, uuid.UUID(mandelbox_id))
    assert box is not None and box.status is MandelboxStatus.ALLOCATED  # the stranger's DELETE changed nothing
    assert clients["public"].get(path, headers=user_headers("a")).status_code == 200


def test_a_host_sees_only_its_own_mandelboxes_and_speaks_only_for_itself(
    clients: dict[str, Any], factories: Factories, host_secret: str, user_headers: Headers, db: Session, aws_env: str
) -> None:
    # host_secret's instance holds the mandelbox; a second ACTIVE host with its own secret probes it.
    assigned = clients["public"].post(
        "/mandelbox/assign", json={"regions": ["us-east-1"], "client_commit_hash": "abc123"}, headers=user_headers()
    )
    mandelbox_id = assigned.get_json()["mandelbox_id"]
    owner_name = assigned.get_json()["instance_name"]
    _other, other_secret = factories.instance()
    host = clients["host"]
    path = f"/host/mandelboxes/{mandelbox_id}"
    assert host.get(path, headers=bearer(host_secret)).status_code == 200
    for response in (
        host.get(path, headers=bearer(other_secret)),
        host.put(path, json={"status": "EXITED"}, headers=bearer(other_secret)),
        host.put(f"{path}/logs", data=b"log", headers=bearer(other_secret)),
    ):
        assert response.status_code == 404 and response.get_json()["error"] == "NOT_FOUND"
    # Speaking for the owner with another host's secret: 401, as for an unknown name.
    beat = host.post("/host/heartbeat", json={"instance_name": owner_name}, headers=bearer(other_secret))
    assert_401(beat, "heartbeat for another instance")
    db.expire_all()
    box = db.get(Mandelbox, uuid.UUID(mandelbox_id))
    assert box is not None and box.status is MandelboxStatus.ALLOCATED


# --- size and length limits ------------------------------------------------------------------------------------

# A valid body per JSON-body operation; each string field with a maxLength (and each array with maxItems) in the
# spec is then sent one over the limit.
VALID_BODIES: dict[tuple[str, str, str], dict[str, Any]] = {
    ("public", "post", "/mandelbox/assign"): {"regions": ["us-east-1"], "client_commit_hash": "abc123"},
    ("public", "post", "/newsletter/subscribe"): {"email": "a@example.com"},
    ("public", "post", "/newsletter/unsubscribe"): {"token": "t"},
    ("admin", "put", "/admin/images/{region}/{client_commit_hash}"): {
        "ami_id": "ami-1",
        "active": True,
        "instance_type": "t3",
        "mandelbox_capacity": 2,
    },
    ("admin", "post", "/admin/instances"): {
        "instance_name": "limit-host",
        "region": "us-east-1",
        "client_commit_hash": "abc123",
        "mandelbox_capacity": 2,
    },
    ("admin", "post", "/admin/mail"): {"template": "welcome", "to": "a@example.com", "args": {"name": "A"}},
    ("admin", "post", "/admin/api-keys"): {"name": "deploy", "scopes": ["admin:read"]},
    ("host", "post", "/host/handshake"): {
        "instance_name": "x",
        "ip": "10.0.0.1",
        "client_commit_hash": "abc123",
        "mandelbox_capacity": 4,
    },
    ("host", "post", "/host/heartbeat"): {"instance_name": "x", "mandelboxes": [], "metrics": {}},
    ("host", "put", "/host/mandelboxes/{mandelbox_id}"): {"status": "RUNNING"},
}


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _limits(spec: dict[str, Any], schema: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(field, over-limit value) for each top-level property with a maxLength or maxItems."""
    for name, prop in _resolve(spec, schema).get("properties", {}).items():
        options = [prop, *prop.get("anyOf", [])]
        for option in options:
            option = _resolve(spec, option)
            if "maxLength" in option:
                yield name, "a" * (option["maxLength"] + 1)
            if "maxItems" in option and option.get("items", {}).get("type") == "string":
                yield name, ["us-east-1"] * (option["maxItems"] + 1)


def test_every_json_body_refuses_over_long_fields(
    clients: dict[str, Any], admin_headers: dict[str, str], user_headers: Headers, host_secret: str
) -> None:
    credentials = {"public": user_headers(), "admin": admin_headers, "host": bearer(host_secret)}
    checked: list[str] = []
    for kind, client in clients.items():
        spec = client.get("/openapi.json").json
        for method, path, operation in operations(client, spec=spec):
            if "requestBody" not in operation:
                continue
            raw_path = operation["x-path"]
            valid = VALID_BODIES.get((kind, method, raw_path))
            assert valid is not None, f"add a valid body for {kind} {method} {raw_path}"
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            for field, value in _limits(spec, schema):
                response = call(client, method, path, headers=credentials[kind], body={**valid, field: value})
                assert response.status_code == 400, (kind, raw_path, field, response.get_json())
                assert response.get_json()["error"] == "VALIDATION_ERROR"
                assert field in json.dumps(response.get_json()["details"]), (kind, raw_path, field)
                checked.append(f"{raw_path}:{field}")
    # The fields the contract names: client_commit_hash ≤ 64, session_id ≤ 128, at most 20 regions.
    assert {"/mandelbox/assign:client_commit_hash", "/mandelbox/assign:session_id", "/mandelbox/assign:regions"} <= set(
        checked
    )
    assert len(checked) >= 15, checked


@pytest.mark.parametrize("kind", KINDS)
def test_every_json_body_over_the_request_limit_is_413(
    kind: str, make_app: Callable[..., APIFlask], admin_headers: dict[str, str], user_headers: Headers, host_secret: str
) -> None:
    client = make_app(kind, max_request_bytes=4096).test_client()
    credentials = {"public": user_headers(), "admin": admin_headers, "host": bearer(host_secret)}[kind]
    huge = json.dumps({"padding": "x" * 300_000})  # above both the app limit and the heartbeat cap
    checked = 0
    for method, path, operation in operations(client):
        if "requestBody" not in operation:
            continue
        response = client.open(
            path, method=method.upper(), data=huge, content_type="application/json", headers=credentials
        )
        assert response.status_code == 413, (kind, method, path, response.status_code)
        assert response.get_json()["error"] == "PAYLOAD_TOO_LARGE"
        checked += 1
    assert checked > 0
