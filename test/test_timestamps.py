"""One time type: every timestamp column reads back timezone-aware UTC on SQLite and Postgres, and every answer
writes times in one RFC 3339 form with ``Z``."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, inspect, select, text
from sqlalchemy.orm import Session

from alembic import command
from fractal.clock import UtcDateTime, format_timestamp
from fractal.cloud.memory import MemoryCloud
from fractal.config import normalise_database_url
from fractal.migrations import run_alembic
from fractal.models import (
    ApiKey,
    Base,
    Event,
    Heartbeat,
    IdempotencyKey,
    Image,
    Instance,
    InstanceStatus,
    Lease,
    LogSender,
    LogUpload,
    Mandelbox,
    MandelboxStatus,
    NewsletterSubscription,
    SubscriptionStatus,
)
from test.conftest import TABLES

# A zone far from UTC: a value written in it must come back as the same instant, in UTC.
KOLKATA = timezone(timedelta(hours=5, minutes=30))
WRITTEN = datetime(2026, 12, 1, 23, 45, 12, 345678, tzinfo=KOLKATA)
RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def timestamp_columns() -> dict[type[Any], list[str]]:
    """Every mapped class and its UtcDateTime columns (a new model with timestamps must be covered below)."""
    found: dict[type[Any], list[str]] = {}
    for mapper in Base.registry.mappers:
        names = [c.key for c in mapper.columns if isinstance(c.type, UtcDateTime)]
        if names:
            found[mapper.class_] = names
    return found


def rows_with_every_timestamp(at: datetime | None) -> list[Any]:
    """One row of every model; ``at`` fills every timestamp column, None leaves server defaults to the database."""
    stamp: Callable[..., dict[str, Any]] = lambda *names: {n: at for n in names} if at is not None else {}  # noqa: E731
    instance = Instance(
        instance_name=f"i-{uuid.uuid4().hex[:8]}",
        region="us-east-1",
        client_commit_hash="abc",
        ami_id="ami-1",
        instance_type="t3.micro",
        mandelbox_capacity=2,
        live_mandelboxes=0 if at is not None else 1,  # the mandelbox below is live when ``at`` is None
        status=InstanceStatus.ACTIVE,
        host_secret_hash=uuid.uuid4().hex,
        **stamp("created_at", "status_changed_at", "empty_since"),
    )
    mandelbox = Mandelbox(
        mandelbox_id=uuid.uuid4(),
        instance_name=instance.instance_name,
        user_id="u",
        # ended_at is set exactly when the box has EXITED (a CHECK constraint says so).
        status=MandelboxStatus.EXITED if at is not None else MandelboxStatus.ALLOCATED,
        **stamp("created_at", "status_changed_at", "ended_at"),
    )
    expires = {"expires_at": at or WRITTEN}
    return [
        Image(
            region=f"r-{uuid.uuid4().hex[:6]}",
            client_commit_hash="abc",
            ami_id="ami-1",
            instance_type="t3.micro",
            mandelbox_capacity=2,
            **stamp("created_at", "updated_at"),
        ),
        instance,
        Heartbeat(instance_name=instance.instance_name, metrics={}, **stamp("last_heartbeat_at")),
        mandelbox,
        Event(kind="test", actor="test", detail={}, **stamp("created_at")),
        IdempotencyKey(
            user_id="u",
            key=uuid.uuid4().hex,
            request_hash="h",
            response_status=201,
            response_body={},
            **expires,
            **stamp("created_at"),
        ),
        NewsletterSubscription(
            email=f"{uuid.uuid4().hex[:8]}@example.com",
            status=SubscriptionStatus.CONFIRMED,
            **stamp("created_at", "confirmed_at", "unsubscribed_at"),
        ),
        Lease(name=f"l-{uuid.uuid4().hex[:8]}", holder="h", fencing_token=1, **expires, **stamp("acquired_at")),
        LogUpload(
            mandelbox_id=mandelbox.mandelbox_id,
            sender=LogSender.HOST,
            key=uuid.uuid4().hex,
            size=1,
            **stamp("uploaded_at"),
        ),
        ApiKey(
            id=uuid.uuid4().hex[:12],
            name="k",
            digest="0" * 64,
            scopes=["admin:read"],
            created_by="test",
            **stamp("created_at", "expires_at", "revoked_at", "last_used_at"),
        ),
    ]


@pytest.fixture(params=["sqlite", "postgresql"])
def any_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fractal.db'}"
        run_alembic(url, command.upgrade, "head")
    else:
        url = request.getfixturevalue("database_url")
    engine = create_engine(normalise_database_url(url))
    yield engine
    if request.param == "postgresql":  # the run's shared database: leave it as the other tests expect it
        with engine.begin() as connection:
            connection.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    engine.dispose()


def _read_back(engine: Engine, rows: list[Any]) -> dict[type[Any], dict[str, Any]]:
    with Session(engine, expire_on_commit=False) as session:
        for row in rows:  # parents first: the list is in foreign-key order
            session.add(row)
            session.flush()
        keys = {type(row): inspect(row).identity for row in rows}
        session.commit()
    read: dict[type[Any], dict[str, Any]] = {}
    with Session(engine) as session:
        for model, columns in timestamp_columns().items():
            pk = inspect(model).primary_key
            condition = [column == value for column, value in zip(pk, keys[model], strict=True)]
            values = session.execute(select(*(getattr(model, c) for c in columns)).where(*condition)).one()
            read[model] = dict(zip(columns, values, strict=True))
        session.rollback()
    return read


def test_every_model_with_timestamps_is_covered() -> None:
    assert set(timestamp_columns()) == {type(row) for row in rows_with_every_timestamp(WRITTEN)}


def test_written_timestamps_read_back_as_the_same_aware_utc_instant(any_engine: Engine) -> None:
    read = _read_back(any_engine, rows_with_every_timestamp(WRITTEN))
    for model, values in read.items():
        for column, value in values.items():
            assert value is not None, (model.__name__, column)
            assert value.utcoffset() == timedelta(0), (model.__name__, column, value)
            assert value == WRITTEN, (model.__name__, column, value)


def test_server_default_timestamps_read_back_aware_utc(any_engine: Engine) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    read = _read_back(any_engine, rows_with_every_timestamp(None))
    defaulted = 0
    for model, values in read.items():
        for column, value in values.items():
            if value is None:  # nullable columns without a default stay empty
                continue
            defaulted += 1
            assert value.utcoffset() == timedelta(0), (model.__name__, column, value)
            # Comparing with an aware "now" must work and be sensible (the bug was a TypeError here).
            assert before <= value <= datetime.now(UTC) + timedelta(seconds=5) or column == "expires_at"
    assert defaulted >= 10


def test_naive_datetimes_are_refused_on_the_way_in(any_engine: Engine) -> None:
    with Session(any_engine) as session:
        session.add(Event(kind="test", actor="test", detail={}, created_at=datetime(2026, 1, 1)))
        with pytest.raises(Exception, match="naive datetime"):
            session.flush()


def test_format_timestamp_is_one_form() -> None:
    assert format_timestamp(WRITTEN) == "2026-12-01T18:15:12.345678Z"
    assert format_timestamp(datetime(2026, 12, 1, 18, 56, 18, tzinfo=UTC)) == "2026-12-01T18:56:18.000000Z"


def _times_in(body: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(body, dict):
        for key, value in body.items():
            if key.endswith("_at"):
                yield key, value
            yield from _times_in(value)
    elif isinstance(body, list):
        for item in body:
            yield from _times_in(item)


def test_every_answer_writes_times_as_rfc3339_z(
    make_app: Callable[..., Any],
    factories: Any,
    user_headers: Callable[..., dict[str, str]],
    admin_headers: dict[str, str],
) -> None:
    factories.image()
    factories.instance()
    public = make_app("public").test_client()
    admin_app = make_app("admin")
    admin_app.extensions["fractal"].cloud = MemoryCloud()  # the pass below launches nothing that outlives the test
    admin = admin_app.test_client()
    assigned = public.post(
        "/mandelbox/assign", json={"regions": ["us-east-1"], "client_commit_hash": "abc123"}, headers=user_headers()
    )
    assert assigned.status_code == 201, assigned.json
    mandelbox_id = assigned.json["mandelbox_id"]
    answers = [
        public.get(f"/mandelbox/{mandelbox_id}", headers=user_headers()),
        admin.get("/admin/images", headers=admin_headers),
        admin.get("/admin/instances", headers=admin_headers),
        admin.get("/admin/mandelboxes", headers=admin_headers),
        admin.get("/admin/events", headers=admin_headers),
        admin.post("/admin/scaling/reconcile", headers=admin_headers),
    ]
    seen = 0
    for answer in answers:
        assert answer.status_code == 200, answer.json
        for key, value in _times_in(answer.json):
            if value is None:
                continue
            seen += 1
            assert isinstance(value, str) and RFC3339_Z.match(value), (answer.request.path, key, value)
    assert seen >= 8
