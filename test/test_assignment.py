"""Public API over HTTP against Postgres: regions, assign (bin packing, region order, refusals), get, delete."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fractal.models import EndReason, Event, Instance, InstanceStatus, Mandelbox, MandelboxStatus
from test.factories import Factories

Headers = Callable[..., dict[str, str]]


def assign(client: Any, headers: dict[str, str], **body: Any) -> Any:
    payload = {"regions": ["us-east-1"], "client_commit_hash": "abc123", **body}
    return client.post("/mandelbox/assign", json=payload, headers=headers)


def test_regions_lists_enabled_regions_sorted(public_client: Any, factories: Factories, user_headers: Headers) -> None:
    factories.image(region="us-west-1")
    factories.image(region="eu-central-1")
    factories.image(region="ap-south-1", active=False)
    response = public_client.get("/regions", headers=user_headers())
    assert response.status_code == 200
    assert response.json == {"regions": ["eu-central-1", "us-west-1"]}


def test_assign_picks_fullest_instance_with_room(
    public_client: Any, factories: Factories, user_headers: Headers, db: Session
) -> None:
    factories.image()
    factories.instance(instance_name="empty", live_mandelboxes=0)
    factories.instance(instance_name="fuller", live_mandelboxes=2)
    factories.instance(instance_name="full", live_mandelboxes=4)
    factories.instance(instance_name="other-version", client_commit_hash="zzz", live_mandelboxes=3)
    response = assign(public_client, user_headers("u1"), session_id="s-1")
    assert response.status_code == 201, response.json
    body = response.json
    assert body["instance_name"] == "fuller"
    assert body["status"] == "ALLOCATED"
    assert body["region"] == "us-east-1"
    assert body["ip"]
    mandelbox = db.get(Mandelbox, uuid.UUID(body["mandelbox_id"]))
    assert mandelbox is not None and mandelbox.user_id == "u1" and mandelbox.session_id == "s-1"
    db.expire_all()
    assert db.get(Instance, "fuller").live_mandelboxes == 3  # type: ignore[union-attr]


def test_assign_tries_regions_in_order(public_client: Any, factories: Factories, user_headers: Headers) -> None:
    factories.image(region="us-east-1")
    factories.image(region="eu-west-1")
    factories.instance(instance_name="east-full", region="us-east-1", live_mandelboxes=4)
    factories.instance(instance_name="west", region="eu-west-1")
    response = assign(public_client, user_headers(), regions=["us-east-1", "eu-west-1"])
    assert response.status_code == 201
    assert response.json["region"] == "eu-west-1"
    assert response.json["instance_name"] == "west"


def test_unknown_and_disabled_regions_are_not_enabled(
    public_client: Any, factories: Factories, user_headers: Headers, db: Session
) -> None:
    factories.image(region="us-east-1", active=False)
    response = assign(public_client, user_headers(), regions=["us-east-1", "mars-north-1"])
    assert response.status_code == 422
    assert response.json["error"] == "REGION_NOT_ENABLED"
    refused = db.scalars(select(Event).where(Event.kind == "assignment.refused")).all()
    assert [event.detail["code"] for event in refused] == ["REGION_NOT_ENABLED"]


def test_commit_hash_mismatch_is_told_apart_from_no_capacity(
    public_client: Any, factories: Factories, user_headers: Headers
) -> None:
    factories.image()
    factories.instance(client_commit_hash="newer")
    response = assign(public_client, user_headers())
    assert response.status_code == 409
    assert response.json["error"] == "COMMIT_HASH_MISMATCH"


def test_no_instance_available_has_retry_after(public_client: Any, factories: Factories, user_headers: Headers) -> None:
    factories.image()
    factories.instance(live_mandelboxes=4)
    factories.instance(status=InstanceStatus.DRAINING)
    factories.instance(status=InstanceStatus.PRE_CONNECTION)
    response = assign(public_client, user_headers())
    assert response.status_code == 503
    assert response.json["error"] == "NO_INSTANCE_AVAILABLE"
    assert int(response.headers["Retry-After"]) > 0


def test_user_limit(public_client: Any, factories: Factories, user_headers: Headers, db: Session) -> None:
    factories.image()
    factories.instance()
    first = assign(public_client, user_headers("same"))
    assert first.status_code == 201
    second = assign(public_client, user_headers("same"))
    assert second.status_code == 409
    assert second.json["error"] == "USER_ALREADY_ACTIVE"
    count = db.execute(select(func.count()).select_from(Mandelbox).where(Mandelbox.user_id == "same")).scalar()
    assert count == 1


def test_user_limit_is_configurable(make_app: Callable[..., Any], factories: Factories, user_headers: Headers) -> None:
    client = make_app("public", max_mandelboxes_per_user=2).test_client()
    factories.image()
    factories.instance()
    statuses = [assign(client, user_headers("two")).status_code for _ in range(3)]
    assert statuses == [201, 201, 409]


def test_local_dev_override_only_in_development(
    make_app: Callable[..., Any], factories: Factories, user_headers: Headers
) -> None:
    factories.image(client_commit_hash="old")
    factories.image(client_commit_hash="new")
    factories.instance(client_commit_hash="new")
    test_env = make_app("public").test_client()
    refused = assign(test_env, user_headers("a"), client_commit_hash="local_dev")
    assert refused.status_code == 409 and refused.json["error"] == "COMMIT_HASH_MISMATCH"
    dev_env = make_app("public", env="development").test_client()
    granted = assign(dev_env, user_headers("b"), client_commit_hash="local_dev")
    assert granted.status_code == 201, granted.json


def test_get_and_delete_mandelbox(public_client: Any, factories: Factories, user_headers: Headers, db: Session) -> None:
    factories.image()
    factories.instance(instance_name="host-a", ip="10.1.2.3")
    mandelbox_id = assign(public_client, user_headers("owner")).json["mandelbox_id"]

    got = public_client.get(f"/mandelbox/{mandelbox_id}", headers=user_headers("owner"))
    assert got.status_code == 200
    assert got.json["status"] == "ALLOCATED"
    assert got.json["ip"] == "10.1.2.3"
    assert got.json["instance_name"] == "host-a"
    assert "user_id" not in got.json

    stranger = public_client.get(f"/mandelbox/{mandelbox_id}", headers=user_headers("stranger"))
    assert stranger.status_code == 404 and stranger.json["error"] == "NOT_FOUND"
    assert public_client.delete(f"/mandelbox/{mandelbox_id}", headers=user_headers("stranger")).status_code == 404

    deleted = public_client.delete(f"/mandelbox/{mandelbox_id}", headers=user_headers("owner"))
    assert deleted.status_code == 202
    assert deleted.json["status"] == "DYING"
    db.expire_all()
    row = db.get(Mandelbox, uuid.UUID(mandelbox_id))
    assert row is not None and row.status == MandelboxStatus.DYING and row.end_reason == EndReason.USER_DELETED
    # A DYING mandelbox still holds its slot until the host reports EXITED.
    assert db.get(Instance, "host-a").live_mandelboxes == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", ["not-a-uuid", "123", str(uuid.uuid4())])
def test_unknown_or_malformed_ids_are_404(public_client: Any, user_headers: Headers, raw: str) -> None:
    response = public_client.get(f"/mandelbox/{raw}", headers=user_headers())
    assert response.status_code == 404
    assert response.json["error"] == "NOT_FOUND"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"regions": [], "client_commit_hash": "abc"}, "regions"),
        ({"regions": ["us-east-1"] * 21, "client_commit_hash": "abc"}, "regions"),
        ({"regions": "us-east-1", "client_commit_hash": "abc"}, "regions"),
        ({"regions": [1], "client_commit_hash": "abc"}, "regions"),
        ({"regions": ["us-east-1"]}, "client_commit_hash"),
        ({"regions": ["us-east-1"], "client_commit_hash": 5}, "client_commit_hash"),
        ({"regions": ["us-east-1"], "client_commit_hash": "x" * 65}, "client_commit_hash"),
        ({"regions": ["us-east-1"], "client_commit_hash": "abc", "session_id": "s" * 129}, "session_id"),
        ({"regions": ["us-east-1"], "client_commit_hash": "abc", "session_id": 7}, "session_id"),
        ([1, 2], None),
    ],
)
def test_bad_bodies_are_400_and_write_nothing(
    public_client: Any, factories: Factories, user_headers: Headers, db: Session, body: Any, field: str | None
) -> None:
    factories.image()
    factories.instance()
    response = public_client.post("/mandelbox/assign", json=body, headers=user_headers())
    assert response.status_code == 400, response.json
    assert response.json["error"] == "VALIDATION_ERROR"
    if field:
        assert field in response.json["message"]
        assert field in str(response.json["details"])
    assert db.execute(select(func.count()).select_from(Mandelbox)).scalar() == 0


def test_malformed_json_is_400(public_client: Any, user_headers: Headers) -> None:
    response = public_client.post(
        "/mandelbox/assign",
        data="{not json",
        headers={**user_headers(), "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json["error"] == "VALIDATION_ERROR"


def test_assign_without_token_is_401(public_client: Any) -> None:
    response = public_client.post("/mandelbox/assign", json={"regions": ["x"], "client_commit_hash": "a"})
    assert response.status_code == 401
    assert response.json["error"] == "UNAUTHORIZED"


def test_on_sqlite_the_user_limit_is_checked_where_the_slot_is_taken() -> None:
    """SQLite (the development default and the simulator) checks the per-user limit in the statement that takes the
    slot and counts only when it took none: over the limit is still USER_ALREADY_ACTIVE, with room or without."""
    from sqlalchemy import create_engine, insert

    from fractal.assignment.service import assign_mandelbox
    from fractal.errors import NoInstanceAvailableError, UserAlreadyActiveError
    from fractal.images import ImageSpec, upsert_image
    from fractal.models import Base

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    session = Session(engine)
    try:
        upsert_image(
            session,
            region="us-east-1",
            client_commit_hash="abc123",
            spec=ImageSpec(ami_id="ami-1", active=True, instance_type="g4dn.xlarge", mandelbox_capacity=3),
            actor="test",
        )
        session.execute(
            insert(Instance).values(
                instance_name="host-1",
                region="us-east-1",
                client_commit_hash="abc123",
                ami_id="ami-1",
                instance_type="g4dn.xlarge",
                mandelbox_capacity=3,
                status=InstanceStatus.ACTIVE,
                cloud_provider_id="i-1",
                host_secret_hash="hash-1",
            )
        )
        session.commit()

        def ask(user: str, limit: int = 1) -> str:
            try:
                assign_mandelbox(
                    session, user_id=user, regions=["us-east-1"], client_commit_hash="abc123", max_per_user=limit
                )
            except (UserAlreadyActiveError, NoInstanceAvailableError) as error:
                session.rollback()
                return error.code
            return "201"

        assert [ask("one"), ask("one")] == ["201", "USER_ALREADY_ACTIVE"]  # room left: refused by the limit
        assert [ask("two", 2), ask("two", 2)] == ["201", "201"]  # the host is full now
        assert ask("one") == "USER_ALREADY_ACTIVE"  # no room either: the limit is the answer, as before
        assert ask("three") == "NO_INSTANCE_AVAILABLE"
        live = session.execute(select(Instance.live_mandelboxes)).scalar_one()
        assert live == 3 == session.execute(select(func.count()).select_from(Mandelbox)).scalar_one()
    finally:
        session.close()
        engine.dispose()
