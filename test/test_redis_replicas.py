"""Two app replicas in separate processes on one real Redis: shared rate limits, shared cache invalidation,
idempotent retries answered by the other replica, and scaler nudges crossing processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from fractal.auth.dev_keys import DevKeyPair
from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.models import Instance, InstanceStatus, Mandelbox
from fractal.nudge import build_nudge
from test.redis_support import (
    REDIS_SERVER_URL,
    app_replica,
    call,
    delete_prefixed,
    replica_env,
    seed_shared_fleet,
    unique_prefix,
)

pytestmark = pytest.mark.slow
ASSIGN_LIMIT = 3


@pytest.fixture(scope="module")
def replicas(
    database_url: str, keypair: DevKeyPair, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, str]]:
    """Replicas A and B (public + admin APIs) sharing the test database and one Redis; yields (a, b, prefix)."""
    prefix = unique_prefix()
    env = replica_env(
        database_url=database_url,
        redis_url=REDIS_SERVER_URL,
        prefix=prefix,
        public_pem=keypair.public_pem,
        assign_limit=ASSIGN_LIMIT,
    )
    logs: Path = tmp_path_factory.mktemp("replicas")
    try:
        with app_replica(env, log_path=logs / "a.log") as a, app_replica(env, log_path=logs / "b.log") as b:
            yield a, b, prefix
    finally:
        delete_prefixed(REDIS_SERVER_URL, prefix)


@pytest.fixture
def fleet(committed_factory: SessionFactory, replicas: tuple[str, str, str]) -> SessionFactory:
    """Committed rows the replicas can see: an active image and one roomy ACTIVE instance in us-east-1.

    Rows written behind the API's back are invalidated by hand, as an operator script would have to.
    """
    seed_shared_fleet(committed_factory, redis_url=REDIS_SERVER_URL, prefix=replicas[2])
    return committed_factory


ASSIGN_BODY = {"regions": ["us-east-1"], "client_commit_hash": "abc123"}


def test_assign_limit_is_shared_by_replicas(
    replicas: tuple[str, str, str], fleet: SessionFactory, make_token: Callable[..., str]
) -> None:
    a, b, _ = replicas
    token = make_token("limited-user")
    statuses = [call(base, "POST", "/mandelbox/assign", token=token, body=ASSIGN_BODY)[0] for base in (a, b, a)]
    assert statuses == [201, 201, 201]
    status, headers, body = call(b, "POST", "/mandelbox/assign", token=token, body=ASSIGN_BODY)
    assert status == 429
    assert body["error"] == "RATE_LIMITED" and body["message"]
    assert 1 <= int(headers["Retry-After"]) <= 61  # the window is one minute (rounded up)
    # Another user has a budget of their own, on either replica.
    assert call(a, "POST", "/mandelbox/assign", token=make_token("other-user"), body=ASSIGN_BODY)[0] == 201
    with fleet() as session:
        assert session.scalar(select(func.count()).select_from(Mandelbox)) == 4


def test_image_change_on_one_replica_is_seen_by_the_other_at_once(
    replicas: tuple[str, str, str], fleet: SessionFactory, make_token: Callable[..., str]
) -> None:
    a, b, _ = replicas
    user, admin = make_token("reader"), make_token("operator", admin=True)
    assert call(b, "GET", "/regions", token=user)[2] == {"regions": ["us-east-1"]}  # now cached for 300 s
    image = {"ami_id": "ami-2", "active": True, "instance_type": "g4dn.xlarge", "mandelbox_capacity": 4}
    assert call(a, "PUT", "/admin/images/eu-west-1/abc123", token=admin, body=image)[0] == 200
    assert call(b, "GET", "/regions", token=user)[2] == {"regions": ["eu-west-1", "us-east-1"]}
    assert call(a, "PUT", "/admin/images/us-east-1/abc123", token=admin, body={**image, "active": False})[0] == 200
    assert call(b, "GET", "/regions", token=user)[2] == {"regions": ["eu-west-1"]}
    # Assign reads the same cached summary: us-east-1 is no longer enabled for it either.
    status, _, body = call(b, "POST", "/mandelbox/assign", token=make_token("late"), body=ASSIGN_BODY)
    assert (status, body["error"]) == (422, "REGION_NOT_ENABLED")


def test_idempotent_retry_is_answered_by_another_replica(
    replicas: tuple[str, str, str], fleet: SessionFactory, make_token: Callable[..., str]
) -> None:
    a, b, _ = replicas
    token = make_token("retrying-user")
    first = call(a, "POST", "/mandelbox/assign", token=token, body=ASSIGN_BODY, headers={"Idempotency-Key": "k-1"})
    retry = call(b, "POST", "/mandelbox/assign", token=token, body=ASSIGN_BODY, headers={"Idempotency-Key": "k-1"})
    assert first[0] == retry[0] == 201
    assert retry[2] == first[2]
    assert retry[1].get("Idempotent-Replayed") == "true"
    with fleet() as session:
        assert session.scalar(select(func.count()).select_from(Mandelbox)) == 1


def test_no_capacity_on_a_replica_nudges_a_scaler_in_another_process(
    replicas: tuple[str, str, str], fleet: SessionFactory, make_token: Callable[..., str], settings: Settings
) -> None:
    a, _, prefix = replicas
    scaler_side = build_nudge(
        Settings(**{**settings.model_dump(), "redis_url": REDIS_SERVER_URL, "redis_prefix": prefix})
    )
    scaler_side.wait(0)  # drop a nudge left by an earlier test
    assert scaler_side.wait(0.2) is False
    with fleet() as session:
        session.get(Instance, "i-shared").status = InstanceStatus.DRAINING  # type: ignore[union-attr]
        session.commit()
    status, headers, body = call(a, "POST", "/mandelbox/assign", token=make_token("nudger"), body=ASSIGN_BODY)
    assert (status, body["error"]) == (503, "NO_INSTANCE_AVAILABLE")
    assert int(headers["Retry-After"]) == 10  # the limiter's headers leave this Retry-After alone
    assert scaler_side.wait(5) is True
    assert scaler_side.wait(0.2) is False  # one nudge wakes one wait
