"""Every bad input of the host protocol and the admin instance routes: a clear 4xx, never a 500, nothing written."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fractal.host_service.schemas import MAX_HEARTBEAT_BYTES, MAX_REPORTED_MANDELBOXES
from fractal.models import Event, Heartbeat, Instance, InstanceStatus, Mandelbox, MandelboxStatus
from test.factories import Factories

Headers = Callable[..., dict[str, str]]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def handshake_body(instance: Instance, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "instance_name": instance.instance_name,
        "ip": "10.0.0.9",
        "client_commit_hash": instance.client_commit_hash,
        "mandelbox_capacity": 4,
    }
    body.update(overrides)
    return body


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body: dict[str, Any] = response.json
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    return body


def event_count(db: Session) -> int:
    return int(db.execute(select(func.count()).select_from(Event)).scalar_one())


@pytest.fixture
def host(factories: Factories) -> tuple[Instance, str]:
    return factories.instance(status=InstanceStatus.PRE_CONNECTION, ip=None)


# --- authentication ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}, {"Authorization": "Bearer not-a-secret"}],
)
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/host/handshake", None),
        ("post", "/host/heartbeat", {"instance_name": "x"}),
        ("get", f"/host/mandelboxes/{uuid.uuid4()}", None),
        ("put", f"/host/mandelboxes/{uuid.uuid4()}", {"status": "RUNNING"}),
    ],
)
def test_missing_or_wrong_secrets_are_401(
    host_client: Any, host: tuple[Instance, str], headers: dict[str, str], method: str, path: str, body: Any
) -> None:
    instance, _ = host
    if path == "/host/handshake":
        body = handshake_body(instance)
    assert_error(getattr(host_client, method)(path, json=body, headers=headers), 401, "UNAUTHORIZED")


def test_a_secret_claiming_another_instance_gets_the_same_401_as_an_unknown_name(
    db: Session, host_client: Any, factories: Factories, host: tuple[Instance, str]
) -> None:
    instance, secret = host
    other, _ = factories.instance()
    wrong_secret = assert_error(
        host_client.post("/host/handshake", json=handshake_body(instance), headers=bearer("x" * 43)),
        401,
        "UNAUTHORIZED",
    )
    for name in (other.instance_name, "i-does-not-exist"):
        body = assert_error(
            host_client.post(
                "/host/handshake", json=handshake_body(instance, instance_name=name), headers=bearer(secret)
            ),
            401,
            "UNAUTHORIZED",
        )
        assert body == wrong_secret  # no hint whether the name exists
        beat = host_client.post("/host/heartbeat", json={"instance_name": name}, headers=bearer(secret))
        assert assert_error(beat, 401, "UNAUTHORIZED") == wrong_secret
    db.expire_all()
    assert db.get(Instance, instance.instance_name).status is InstanceStatus.PRE_CONNECTION  # type: ignore[union-attr]
    assert db.get(Instance, other.instance_name).status is InstanceStatus.ACTIVE  # type: ignore[union-attr]
    assert db.execute(select(func.count()).select_from(Heartbeat)).scalar() == 0


def test_user_tokens_are_refused_on_host_routes_and_host_secrets_on_user_and_admin_routes(
    host_client: Any, public_client: Any, admin_client: Any, host: tuple[Instance, str], admin_headers: dict[str, str]
) -> None:
    instance, secret = host
    assert_error(
        host_client.post("/host/handshake", json=handshake_body(instance), headers=admin_headers), 401, "UNAUTHORIZED"
    )
    assert_error(public_client.get("/regions", headers=bearer(secret)), 401, "UNAUTHORIZED")
    assert_error(admin_client.get("/admin/instances", headers=bearer(secret)), 401, "UNAUTHORIZED")
    assert_error(admin_client.post("/admin/instances/x/drain", headers=bearer(secret)), 401, "UNAUTHORIZED")


# --- handshake and heartbeat bodies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"ip": "not-an-ip"},
        {"ip": 10},
        {"mandelbox_capacity": "4"},
        {"mandelbox_capacity": 0},
        {"mandelbox_capacity": 10_001},
        {"client_commit_hash": "x" * 65},
        {"client_commit_hash": ""},
        {"instance_name": None},
    ],
)
def test_bad_handshake_bodies_are_400_and_change_nothing(
    db: Session, host_client: Any, host: tuple[Instance, str], overrides: dict[str, Any]
) -> None:
    instance, secret = host
    body = assert_error(
        host_client.post("/host/handshake", json=handshake_body(instance, **overrides), headers=bearer(secret)),
        400,
        "VALIDATION_ERROR",
    )
    assert "details" in body
    db.expire_all()
    assert db.get(Instance, instance.instance_name).status is InstanceStatus.PRE_CONNECTION  # type: ignore[union-attr]


def test_malformed_json_and_missing_fields_are_400(host_client: Any, host: tuple[Instance, str]) -> None:
    _, secret = host
    headers = {**bearer(secret), "Content-Type": "application/json"}
    assert_error(host_client.post("/host/handshake", data="{not json", headers=headers), 400, "VALIDATION_ERROR")
    assert_error(host_client.post("/host/heartbeat", data="[1, 2]", headers=headers), 400, "VALIDATION_ERROR")
    assert_error(host_client.post("/host/heartbeat", json={}, headers=bearer(secret)), 400, "VALIDATION_ERROR")


@pytest.mark.parametrize(
    "extra",
    [
        {"mandelboxes": [{"mandelbox_id": "nope", "status": "RUNNING"}]},
        {"mandelboxes": [{"mandelbox_id": str(uuid.uuid4()), "status": "SLEEPING"}]},
        {"mandelboxes": [{"mandelbox_id": str(uuid.uuid4())}]},
        {"mandelboxes": "all of them"},
        {"mandelboxes": [{"mandelbox_id": str(uuid.uuid4()), "status": "RUNNING"}] * (MAX_REPORTED_MANDELBOXES + 1)},
        {"metrics": {"blob": "x" * 20_000}},
        {"metrics": {f"k{i}": i for i in range(200)}},
        {"metrics": [1, 2]},
    ],
    ids=[
        "bad-uuid",
        "bad-status",
        "no-status",
        "not-a-list",
        "too-many",
        "metrics-too-big",
        "metrics-too-many-keys",
        "metrics-list",
    ],
)
def test_bad_heartbeats_are_400_and_write_nothing(
    db: Session, host_client: Any, factories: Factories, extra: dict[str, Any]
) -> None:
    instance, secret = factories.instance()
    body = {"instance_name": instance.instance_name, **extra}
    assert_error(host_client.post("/host/heartbeat", json=body, headers=bearer(secret)), 400, "VALIDATION_ERROR")
    assert db.get(Heartbeat, instance.instance_name) is None


def test_oversized_heartbeat_bodies_are_413(db: Session, host_client: Any, factories: Factories) -> None:
    instance, secret = factories.instance()
    padding = "x" * (MAX_HEARTBEAT_BYTES + 1)
    body = {"instance_name": instance.instance_name, "metrics": {"padding": padding}}
    assert_error(host_client.post("/host/heartbeat", json=body, headers=bearer(secret)), 413, "PAYLOAD_TOO_LARGE")
    assert db.get(Heartbeat, instance.instance_name) is None
    # The same size is fine elsewhere (the app-wide cap is larger), so the heartbeat cap is its own.
    ok = host_client.post("/host/heartbeat", json={"instance_name": instance.instance_name}, headers=bearer(secret))
    assert ok.status_code == 200


# --- mandelbox reports -------------------------------------------------------------------------------------


def add_box(db: Session, instance: Instance, status: MandelboxStatus) -> Mandelbox:
    box = Mandelbox(instance_name=instance.instance_name, user_id="u1", status=status)
    if status is MandelboxStatus.EXITED:
        box.ended_at = instance.created_at
    else:
        instance.live_mandelboxes += 1
    db.add(box)
    db.commit()
    return box


def test_unknown_foreign_and_malformed_mandelbox_ids_are_404(
    db: Session, host_client: Any, factories: Factories
) -> None:
    mine, secret = factories.instance()
    other, _ = factories.instance()
    foreign = add_box(db, other, MandelboxStatus.ALLOCATED)
    before = event_count(db)
    for mandelbox_id in (foreign.mandelbox_id, uuid.uuid4(), "not-a-uuid", "1" * 500):
        assert_error(host_client.get(f"/host/mandelboxes/{mandelbox_id}", headers=bearer(secret)), 404, "NOT_FOUND")
        put = host_client.put(f"/host/mandelboxes/{mandelbox_id}", json={"status": "EXITED"}, headers=bearer(secret))
        assert_error(put, 404, "NOT_FOUND")
    db.expire_all()
    assert db.get(Mandelbox, foreign.mandelbox_id).status is MandelboxStatus.ALLOCATED  # type: ignore[union-attr]
    assert db.get(Instance, other.instance_name).live_mandelboxes == 1  # type: ignore[union-attr]
    assert event_count(db) == before
    assert mine.live_mandelboxes == 0


@pytest.mark.parametrize("status", ["SLEEPING", "", None, 3, "running"])
def test_bad_status_values_are_400(db: Session, host_client: Any, factories: Factories, status: Any) -> None:
    instance, secret = factories.instance()
    box = add_box(db, instance, MandelboxStatus.ALLOCATED)
    put = host_client.put(f"/host/mandelboxes/{box.mandelbox_id}", json={"status": status}, headers=bearer(secret))
    assert_error(put, 400, "VALIDATION_ERROR")


S = MandelboxStatus
ALLOWED = {
    (S.ALLOCATED, S.CONNECTING),
    (S.ALLOCATED, S.EXITED),
    (S.CONNECTING, S.RUNNING),
    (S.CONNECTING, S.EXITED),
    (S.RUNNING, S.DYING),
    (S.RUNNING, S.EXITED),
    (S.DYING, S.EXITED),
}


@pytest.mark.parametrize("current", list(S))
@pytest.mark.parametrize("target", list(S))
def test_mandelbox_state_machine(
    db: Session, host_client: Any, factories: Factories, current: MandelboxStatus, target: MandelboxStatus
) -> None:
    instance, secret = factories.instance(mandelbox_capacity=2)
    box = add_box(db, instance, current)
    live_before = 0 if current is S.EXITED else 1
    events_before = event_count(db)
    put = host_client.put(f"/host/mandelboxes/{box.mandelbox_id}", json={"status": target}, headers=bearer(secret))
    db.expire_all()
    row = db.get(Mandelbox, box.mandelbox_id)
    live = db.get(Instance, instance.instance_name).live_mandelboxes  # type: ignore[union-attr]
    assert row is not None
    if current is target:
        assert put.status_code == 200 and put.json["status"] == current  # a replay is a no-op
        assert (row.status, live, event_count(db)) == (current, live_before, events_before)
    elif (current, target) in ALLOWED:
        assert put.status_code == 200
        assert put.json == {
            "mandelbox_id": str(box.mandelbox_id),
            "user_id": "u1",
            "session_id": None,
            "status": target,
        }
        assert row.status is target
        if target is S.EXITED:
            assert (live, row.end_reason, row.ended_at is not None) == (0, "HOST_EXITED", True)
        else:
            assert (live, row.end_reason) == (1, None)
    else:
        body = assert_error(put, 409, "INVALID_TRANSITION")
        assert body["details"] == {"from": current, "to": target}
        assert (row.status, live) == (current, live_before)
        refusal = db.scalars(select(Event).order_by(Event.id.desc()).limit(1)).one()
        assert refusal.kind == "host.refused" and refusal.detail["code"] == "INVALID_TRANSITION"


# --- admin instance routes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"instance_name": ""},
        {"instance_name": "has space"},
        {"instance_name": "x" * 129},
        {"region": "US EAST"},
        {"mandelbox_capacity": 0},
        {"mandelbox_capacity": "2"},
        {"client_commit_hash": 5},
        {"cloud_provider_id": ""},
    ],
)
def test_bad_instance_registrations_are_400(
    db: Session, admin_client: Any, admin_headers: dict[str, str], overrides: dict[str, Any]
) -> None:
    body = {"instance_name": "i-x", "region": "us-east-1", "client_commit_hash": "abc", "mandelbox_capacity": 2}
    body.update(overrides)
    assert_error(admin_client.post("/admin/instances", json=body, headers=admin_headers), 400, "VALIDATION_ERROR")
    assert db.execute(select(func.count()).select_from(Instance)).scalar() == 0


def test_duplicate_registrations_are_409_conflict(
    db: Session, admin_client: Any, admin_headers: dict[str, str], user_headers: Headers
) -> None:
    body = {"instance_name": "i-dup", "region": "us-east-1", "client_commit_hash": "abc", "mandelbox_capacity": 2}
    first = admin_client.post("/admin/instances", json={**body, "cloud_provider_id": "i-0aa"}, headers=admin_headers)
    assert first.status_code == 201
    assert_error(admin_client.post("/admin/instances", json=body, headers=admin_headers), 409, "CONFLICT")
    same_cloud_id = {**body, "instance_name": "i-dup-2", "cloud_provider_id": "i-0aa"}
    assert_error(admin_client.post("/admin/instances", json=same_cloud_id, headers=admin_headers), 409, "CONFLICT")
    assert_error(admin_client.post("/admin/instances", json=body, headers=user_headers("someone")), 403, "FORBIDDEN")
    assert db.execute(select(func.count()).select_from(Instance)).scalar() == 1


def test_drain_of_unknown_or_ended_instances(
    db: Session, admin_client: Any, admin_headers: dict[str, str], factories: Factories, user_headers: Headers
) -> None:
    assert_error(admin_client.post("/admin/instances/i-nope/drain", headers=admin_headers), 404, "NOT_FOUND")
    for status in (InstanceStatus.LOST, InstanceStatus.TERMINATING, InstanceStatus.TERMINATED):
        instance, _ = factories.instance(status=status)
        response = admin_client.post(f"/admin/instances/{instance.instance_name}/drain", headers=admin_headers)
        assert_error(response, 409, "INVALID_TRANSITION")
    booting, _ = factories.instance(status=InstanceStatus.PRE_CONNECTION)
    for _ in range(2):  # the second drain is a no-op
        drained = admin_client.post(f"/admin/instances/{booting.instance_name}/drain", headers=admin_headers)
        assert drained.status_code == 200 and drained.json["status"] == "DRAINING"
    assert db.execute(select(func.count()).select_from(Event).where(Event.kind == "instance.drained")).scalar() == 1
    forbidden = admin_client.post(f"/admin/instances/{booting.instance_name}/drain", headers=user_headers("x"))
    assert_error(forbidden, 403, "FORBIDDEN")


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=abc", "limit=-1"])
def test_bad_event_limits_are_400(admin_client: Any, admin_headers: dict[str, str], query: str) -> None:
    assert_error(admin_client.get(f"/admin/events?{query}", headers=admin_headers), 400, "VALIDATION_ERROR")
