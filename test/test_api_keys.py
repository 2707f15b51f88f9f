"""API keys on the admin API: every scope against every admin route (read from the app's url_map, so a new route
is covered the day it is added), creation shown once and stored as a digest, revoked, expired, tampered, another
key's secret, unknown, keys refused by the public and host APIs, last_used_at refreshed at most once a minute, audit
events, no escalation through a key."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from apiflask import APIFlask
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from fractal.auth.api_keys import ApiScope, effective_scopes
from fractal.clock import database_now, format_timestamp
from fractal.models import ApiKey, Event
from test.factories import Factories

SCOPE_SETS = [
    frozenset({ApiScope.ADMIN_READ}),
    frozenset({ApiScope.ADMIN_WRITE}),
    frozenset({ApiScope.IMAGES_WRITE}),
    frozenset({ApiScope.ADMIN_READ, ApiScope.IMAGES_WRITE}),
    frozenset(ApiScope),
]
IGNORED_METHODS = {"HEAD", "OPTIONS"}


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@pytest.fixture
def admin_app(make_app: Callable[..., APIFlask]) -> APIFlask:
    return make_app("admin")


@pytest.fixture
def client(admin_app: APIFlask) -> Any:
    return admin_app.test_client()


@pytest.fixture
def create_key(client: Any, admin_headers: dict[str, str]) -> Callable[..., dict[str, Any]]:
    def _create(*scopes: str, name: str = "deploy", **extra: Any) -> dict[str, Any]:
        response = client.post(
            "/admin/api-keys", json={"name": name, "scopes": list(scopes), **extra}, headers=admin_headers
        )
        assert response.status_code == 201, response.get_json()
        body: dict[str, Any] = response.get_json()
        return body

    return _create


def admin_routes(app: APIFlask) -> Iterator[tuple[str, str, Any]]:
    """(method, rule, view) for every route of the admin app under /admin."""
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/admin"):
            continue
        for method in sorted((rule.methods or set()) - IGNORED_METHODS):
            yield method, rule.rule, app.view_functions[rule.endpoint]


def concrete(rule: str) -> str:
    parts = rule.split("/")
    return "/".join((str(uuid.uuid4()) if "id" in part else "x") if part.startswith("<") else part for part in parts)


def expected_scope(method: str, rule: str) -> ApiScope:
    """The contract, written independently of the views: reads need admin:read, publishing and deactivating images
    images:write, every other write admin:write."""
    if method == "GET":
        return ApiScope.ADMIN_READ
    if method == "PUT" and rule.startswith("/admin/images/"):
        return ApiScope.IMAGES_WRITE
    return ApiScope.ADMIN_WRITE


def test_every_admin_route_declares_the_scope_its_method_needs(admin_app: APIFlask) -> None:
    routes = list(admin_routes(admin_app))
    assert len(routes) >= 14, routes
    for method, rule, view in routes:
        declared = getattr(view, "required_scope", None)
        assert declared == expected_scope(method, rule), (method, rule, declared)


@pytest.mark.parametrize("scopes", SCOPE_SETS, ids=lambda s: "+".join(sorted(s)))
def test_every_scope_against_every_admin_route(
    admin_app: APIFlask, client: Any, create_key: Callable[..., dict[str, Any]], scopes: frozenset[ApiScope]
) -> None:
    key = create_key(*sorted(scopes))["key"]
    held = effective_scopes(scopes)
    allowed = refused = 0
    for method, rule, _view in admin_routes(admin_app):
        response = client.open(
            concrete(rule), method=method, json={} if method in {"POST", "PUT"} else None, headers=bearer(key)
        )
        label = (sorted(scopes), method, rule, response.status_code, response.get_json())
        if expected_scope(method, rule) in held:
            allowed += 1
            assert response.status_code not in (401, 403), label
        else:
            refused += 1
            assert response.status_code == 403, label
            assert response.get_json()["error"] == "FORBIDDEN", label
            assert expected_scope(method, rule) in response.get_json()["message"], label
    assert allowed + refused >= 14
    if scopes == frozenset({ApiScope.IMAGES_WRITE}):
        assert allowed == 1  # the image upsert only


def test_admin_write_implies_images_write_and_nothing_else_implies_anything() -> None:
    assert effective_scopes({ApiScope.ADMIN_WRITE}) == {ApiScope.ADMIN_WRITE, ApiScope.IMAGES_WRITE}
    assert effective_scopes({ApiScope.ADMIN_READ}) == {ApiScope.ADMIN_READ}
    assert effective_scopes({ApiScope.IMAGES_WRITE}) == {ApiScope.IMAGES_WRITE}


def test_a_key_is_shown_once_and_stored_as_a_digest(
    client: Any, admin_headers: dict[str, str], create_key: Callable[..., dict[str, Any]], db: Session
) -> None:
    created = create_key("admin:read", name="pipeline")
    key = created["key"]
    assert key.startswith(f"fk_{created['id']}_") and len(key) > 50
    assert created["scopes"] == ["admin:read"] and created["created_by"] == "admin:operator"
    assert created["revoked_at"] is None and created["last_used_at"] is None and created["expires_at"] is None
    row = db.get(ApiKey, created["id"])
    assert row is not None and key not in (row.digest, row.name) and key.split("_")[-1] not in row.digest
    listed = client.get("/admin/api-keys", headers=admin_headers).get_json()
    assert [entry["id"] for entry in listed["api_keys"]] == [created["id"]]
    assert "key" not in listed["api_keys"][0] and key not in str(listed)
    assert client.get("/admin/capacity", headers=bearer(key)).status_code == 200
    events = db.execute(select(Event).where(Event.kind == "api_key.created")).scalars().all()
    assert [event.detail["key_id"] for event in events] == [created["id"]]
    assert key not in str([event.detail for event in events])


def test_what_a_key_does_is_audited_as_the_key(
    client: Any, create_key: Callable[..., dict[str, Any]], db: Session
) -> None:
    created = create_key("images:write")
    body = {"ami_id": "ami-1", "active": True, "instance_type": "t3", "mandelbox_capacity": 2}
    response = client.put("/admin/images/us-east-1/v2", json=body, headers=bearer(created["key"]))
    assert response.status_code == 200, response.get_json()
    actors = db.execute(select(Event.actor).where(Event.kind == "image.changed")).scalars().all()
    assert actors == [f"api_key:{created['id']}"]


def test_revoked_key_is_401_and_both_are_events(
    client: Any, admin_headers: dict[str, str], create_key: Callable[..., dict[str, Any]], db: Session
) -> None:
    created = create_key("admin:read")
    assert client.get("/admin/events", headers=bearer(created["key"])).status_code == 200
    revoked = client.delete(f"/admin/api-keys/{created['id']}", headers=admin_headers)
    assert revoked.status_code == 200 and revoked.get_json()["revoked_at"] is not None
    again = client.delete(f"/admin/api-keys/{created['id']}", headers=admin_headers)
    assert again.get_json()["revoked_at"] == revoked.get_json()["revoked_at"]
    response = client.get("/admin/events", headers=bearer(created["key"]))
    assert response.status_code == 401 and response.get_json()["error"] == "UNAUTHORIZED"
    assert "revoked" in response.get_json()["message"]
    kinds = db.execute(select(Event.kind, Event.detail).where(Event.kind.like("api_key.%")).order_by(Event.id)).all()
    assert [kind for kind, _ in kinds] == ["api_key.created", "api_key.revoked", "api_key.refused"]
    assert kinds[2][1]["reason"] == "revoked"
    assert client.delete(f"/admin/api-keys/{'0' * 12}", headers=admin_headers).status_code == 404


def test_expired_key_is_401_and_an_event(client: Any, create_key: Callable[..., dict[str, Any]], db: Session) -> None:
    soon = database_now(db) + timedelta(hours=1)
    created = create_key("admin:read", expires_at=format_timestamp(soon))
    assert created["expires_at"] == format_timestamp(soon)
    assert client.get("/admin/capacity", headers=bearer(created["key"])).status_code == 200
    db.execute(
        update(ApiKey).where(ApiKey.id == created["id"]).values(expires_at=database_now(db) - timedelta(seconds=1))
    )
    db.commit()
    response = client.get("/admin/capacity", headers=bearer(created["key"]))
    assert response.status_code == 401 and "expired" in response.get_json()["message"]
    detail = db.execute(select(Event.detail).where(Event.kind == "api_key.refused")).scalar_one()
    assert detail == {"key_id": created["id"], "name": "deploy", "reason": "expired"}


def test_an_expiry_must_be_in_the_future_and_carry_an_offset(
    client: Any, admin_headers: dict[str, str], db: Session
) -> None:
    past = format_timestamp(database_now(db) - timedelta(minutes=1))
    for expires_at in (past, "2030-01-01T00:00:00", "soon"):
        response = client.post(
            "/admin/api-keys",
            json={"name": "x", "scopes": ["admin:read"], "expires_at": expires_at},
            headers=admin_headers,
        )
        assert response.status_code == 400, (expires_at, response.get_json())
    for scopes in ([], ["admin"], ["admin:read", "root"]):
        response = client.post("/admin/api-keys", json={"name": "x", "scopes": scopes}, headers=admin_headers)
        assert response.status_code == 400, (scopes, response.get_json())


def test_tampered_unknown_and_another_keys_secret_are_401_without_events(
    client: Any, create_key: Callable[..., dict[str, Any]], db: Session
) -> None:
    first, second = create_key("admin:read", name="a"), create_key("admin:read", name="b")
    key = first["key"]
    flipped = key[:-1] + ("A" if key[-1] != "A" else "B")
    swapped = f"fk_{first['id']}_{second['key'].split('_', 2)[2]}"  # a's id with b's (valid) secret
    unknown = f"fk_{'0' * 12}_{key.split('_', 2)[2]}"
    for credential in (flipped, swapped, unknown, "fk_", "fk_short_x", key + "x", key.upper()):
        response = client.get("/admin/capacity", headers=bearer(credential))
        assert response.status_code == 401, (credential, response.get_json())
        assert response.get_json()["error"] == "UNAUTHORIZED"
    # b's digest stored under a's id does not make b's key work as a: the digest covers the id too.
    db.execute(update(ApiKey).where(ApiKey.id == first["id"]).values(digest=db.get(ApiKey, second["id"]).digest))
    db.commit()
    assert client.get("/admin/capacity", headers=bearer(swapped)).status_code == 401
    assert client.get("/admin/capacity", headers=bearer(second["key"])).status_code == 200
    assert db.execute(select(Event).where(Event.kind == "api_key.refused")).first() is None


def test_keys_are_refused_by_the_public_and_host_apis(
    make_app: Callable[..., APIFlask], create_key: Callable[..., dict[str, Any]], factories: Factories
) -> None:
    key = create_key(*ApiScope)["key"]
    public = make_app("public").test_client()
    response = public.get("/regions", headers=bearer(key))
    assert response.status_code == 401 and "admin API only" in response.get_json()["message"]
    assert public.post("/mandelbox/assign", json={}, headers=bearer(key)).status_code == 401
    factories.image()
    instance, _secret = factories.instance()
    host = make_app("host").test_client()
    body = {"instance_name": instance.instance_name, "mandelboxes": [], "metrics": {}}
    assert host.post("/host/heartbeat", json=body, headers=bearer(key)).status_code == 401


def test_last_used_at_is_written_at_most_once_a_minute(
    client: Any, admin_headers: dict[str, str], create_key: Callable[..., dict[str, Any]], db: Session
) -> None:
    created = create_key("admin:read")

    def last_used() -> Any:
        db.expire_all()
        row = db.get(ApiKey, created["id"])
        assert row is not None
        return row.last_used_at

    client.get("/admin/capacity", headers=bearer(created["key"]))
    first = last_used()
    assert first is not None
    client.get("/admin/capacity", headers=bearer(created["key"]))
    assert last_used() == first
    db.execute(update(ApiKey).where(ApiKey.id == created["id"]).values(last_used_at=first - timedelta(seconds=61)))
    db.commit()
    client.get("/admin/capacity", headers=bearer(created["key"]))
    assert last_used() > first - timedelta(seconds=61)
    listed = client.get("/admin/api-keys", headers=admin_headers).get_json()["api_keys"][0]
    assert listed["last_used_at"] is not None


def test_a_key_cannot_create_a_wider_key(client: Any, create_key: Callable[..., dict[str, Any]]) -> None:
    writer = create_key("admin:write")
    wider = client.post("/admin/api-keys", json={"name": "x", "scopes": ["admin:read"]}, headers=bearer(writer["key"]))
    assert wider.status_code == 403 and "admin:read" in wider.get_json()["message"]
    narrower = client.post(
        "/admin/api-keys", json={"name": "ci", "scopes": ["images:write"]}, headers=bearer(writer["key"])
    )
    assert narrower.status_code == 201 and narrower.get_json()["created_by"] == f"api_key:{writer['id']}"


def test_key_list_pages(client: Any, admin_headers: dict[str, str], create_key: Callable[..., dict[str, Any]]) -> None:
    ids = {create_key("admin:read", name=f"k{n}")["id"] for n in range(5)}
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):
        query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/admin/api-keys", query_string=query, headers=admin_headers).get_json()
        seen += [entry["id"] for entry in page["api_keys"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    bad = client.get("/admin/api-keys", query_string={"cursor": "bm9wZQ"}, headers=admin_headers)
    assert bad.status_code == 400


def test_digest_column_never_holds_a_key(db: Session, create_key: Callable[..., dict[str, Any]]) -> None:
    key = create_key("admin:read")["key"]
    dump = db.execute(text("SELECT id, name, digest, scopes::text, created_by FROM api_keys")).all()
    assert key not in str(dump) and key.split("_", 2)[2] not in str(dump)
