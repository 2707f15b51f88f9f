"""Idempotent assign: replays, key reuse, validation, expiry, and concurrent retries on committed rows."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from apiflask import APIFlask
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fractal.clock import utcnow
from fractal.database import SessionFactory
from fractal.models import IdempotencyKey, Image, Instance, InstanceStatus, Mandelbox
from test.factories import Factories

Headers = Callable[..., dict[str, str]]
ASSIGN = {"regions": ["us-east-1"], "client_commit_hash": "abc123"}


def assign(client: Any, headers: dict[str, str], key: str | None, **body: Any) -> Any:
    extra = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/mandelbox/assign", json={**ASSIGN, **body}, headers={**headers, **extra})


def count(session: Session, model: Any) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def test_retry_returns_the_first_answer_exactly(
    public_client: Any, factories: Factories, user_headers: Headers, db: Session
) -> None:
    factories.image()
    factories.instance()
    first = assign(public_client, user_headers("u1"), "key-1", session_id="s1")
    retry = assign(public_client, user_headers("u1"), "key-1", session_id="s1")
    assert first.status_code == retry.status_code == 201
    assert retry.json == first.json
    assert retry.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert count(db, Mandelbox) == 1  # without the key the retry would be 409 USER_ALREADY_ACTIVE
    stored = db.get(IdempotencyKey, ("u1", "key-1"))
    assert stored is not None and stored.response_status == 201
    assert stored.mandelbox_id == uuid.UUID(first.json["mandelbox_id"])
    assert stored.expires_at - stored.created_at == timedelta(hours=24)


def test_same_key_other_body_is_refused_and_keys_are_per_user(
    public_client: Any, factories: Factories, user_headers: Headers, db: Session
) -> None:
    factories.image()
    factories.instance()
    assert assign(public_client, user_headers("u1"), "shared").status_code == 201
    reused = assign(public_client, user_headers("u1"), "shared", session_id="different")
    assert reused.status_code == 422
    assert reused.json["error"] == "IDEMPOTENCY_KEY_REUSED"
    # The same key string from another user is another key.
    assert assign(public_client, user_headers("u2"), "shared").status_code == 201
    assert count(db, Mandelbox) == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "caf\u00e9"])
def test_malformed_keys_are_400(public_client: Any, factories: Factories, user_headers: Headers, key: str) -> None:
    factories.image()
    factories.instance()
    response = public_client.post(
        "/mandelbox/assign", json=ASSIGN, headers={**user_headers(), "Idempotency-Key": key.encode().decode("latin-1")}
    )
    assert response.status_code == 400
    assert response.json["error"] == "VALIDATION_ERROR"


def test_longest_printable_key_is_accepted(public_client: Any, factories: Factories, user_headers: Headers) -> None:
    factories.image()
    factories.instance()
    key = "A-z 0~!" + "k" * 248
    assert assign(public_client, user_headers(), key).status_code == 201
    assert assign(public_client, user_headers(), key).status_code == 201


def test_refusals_are_not_stored_and_are_evaluated_again(
    public_client: Any, factories: Factories, user_headers: Headers, db: Session
) -> None:
    factories.image()
    refused = assign(public_client, user_headers("u1"), "early")
    assert (refused.status_code, refused.json["error"]) == (503, "NO_INSTANCE_AVAILABLE")
    assert db.get(IdempotencyKey, ("u1", "early")) is None
    factories.instance()
    assert assign(public_client, user_headers("u1"), "early").status_code == 201


def test_expired_keys_are_ignored_replaced_and_purged(
    make_app: Callable[..., APIFlask], factories: Factories, user_headers: Headers, db: Session
) -> None:
    factories.image()
    factories.instance(mandelbox_capacity=10)
    client = make_app("public", max_mandelboxes_per_user=10).test_client()
    first = assign(client, user_headers("u1"), "old")
    stale = db.get(IdempotencyKey, ("u1", "old"))
    assert stale is not None
    stale.expires_at = utcnow() - timedelta(seconds=1)
    other_user_stale = IdempotencyKey(
        user_id="gone",
        key="k",
        request_hash="0" * 64,
        response_status=201,
        response_body={},
        expires_at=utcnow() - timedelta(days=2),
    )
    db.add(other_user_stale)
    db.commit()
    # An expired key does not replay (nor refuse a different body): the request is new.
    again = assign(client, user_headers("u1"), "old", session_id="another body")
    assert again.status_code == 201
    assert again.json["mandelbox_id"] != first.json["mandelbox_id"]
    db.expire_all()
    replaced = db.get(IdempotencyKey, ("u1", "old"))
    assert replaced is not None and replaced.expires_at > utcnow()
    assert replaced.mandelbox_id == uuid.UUID(again.json["mandelbox_id"])
    assert db.get(IdempotencyKey, ("gone", "k")) is None  # purged on the way


def test_ttl_follows_the_setting(
    make_app: Callable[..., APIFlask], factories: Factories, user_headers: Headers, db: Session
) -> None:
    factories.image()
    factories.instance()
    assign(make_app("public", idempotency_ttl_s=60).test_client(), user_headers("u1"), "short")
    stored = db.get(IdempotencyKey, ("u1", "short"))
    assert stored is not None and stored.expires_at - stored.created_at == timedelta(seconds=60)


@pytest.mark.slow
def test_concurrent_retries_with_one_key_create_one_mandelbox(
    make_app: Callable[..., APIFlask], committed_factory: SessionFactory, user_headers: Headers
) -> None:
    with committed_factory() as session:
        session.add(
            Image(
                region="us-east-1",
                client_commit_hash="abc123",
                ami_id="ami-1",
                active=True,
                instance_type="g4dn.xlarge",
                mandelbox_capacity=20,
            )
        )
        for n in range(3):
            session.add(
                Instance(
                    instance_name=f"i-{n}",
                    region="us-east-1",
                    client_commit_hash="abc123",
                    ami_id="ami-1",
                    instance_type="g4dn.xlarge",
                    ip=f"10.0.0.{n + 1}",
                    mandelbox_capacity=20,
                    live_mandelboxes=0,
                    status=InstanceStatus.ACTIVE,
                    host_secret_hash=f"{n}" * 64,
                )
            )
        session.commit()
    # Two replicas of the app, five threads on each, all sending the same key at once.
    apps = [make_app("public", factory=committed_factory, max_mandelboxes_per_user=20) for _ in range(2)]
    headers = user_headers("racer")
    barrier = threading.Barrier(10)
    answers: list[tuple[int, Any]] = []
    lock = threading.Lock()

    def run(app: APIFlask) -> None:
        client = app.test_client()
        barrier.wait(timeout=10)
        response = assign(client, headers, "one-key")
        with lock:
            answers.append((response.status_code, response.json))

    threads = [threading.Thread(target=run, args=(apps[n % 2],)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(answers) == 10
    assert {status for status, _ in answers} == {201}
    assert len({answer["mandelbox_id"] for _, answer in answers}) == 1
    with committed_factory() as session:
        assert count(session, Mandelbox) == 1
        assert count(session, IdempotencyKey) == 1
        assert sum(session.scalars(select(Instance.live_mandelboxes))) == 1


def test_replays_do_not_count_against_the_assign_rate_limit(
    make_app: Callable[..., APIFlask], factories: Factories, user_headers: Headers, db: Session
) -> None:
    factories.image()
    factories.instance()
    client = make_app("public", assign_rate_limit="10 per minute").test_client()
    answers = [assign(client, user_headers("u1"), "retry-key") for _ in range(30)]
    assert [answer.status_code for answer in answers] == [201] * 30  # 1 created, 29 replayed, none refused
    assert all(answer.json == answers[0].json for answer in answers)
    assert count(db, Mandelbox) == 1
    # New work still counts, and the replays spent nothing: 9 more fresh keys fit the budget of 10, the next does not.
    fresh = [assign(client, user_headers("u1"), f"k-{n}", session_id="x").status_code for n in range(9)]
    assert 429 not in fresh
    assert assign(client, user_headers("u1"), "k-last", session_id="x").status_code == 429
