"""Admin lists page with a cursor: `limit` in, `next_cursor` out, every row exactly once, bad cursors are 400."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from fractal.config import Settings
from fractal.database import create_db_engine, create_session_factory
from fractal.events import EventKind, record_event
from fractal.fleet.views import list_mandelbox_views
from fractal.migrations import upgrade_to_head
from fractal.models import Event, Image, Instance, InstanceStatus, Mandelbox, MandelboxStatus
from fractal.pagination import encode_cursor
from test.factories import Factories

LISTS = {
    "/admin/images": "images",
    "/admin/instances": "instances",
    "/admin/mandelboxes": "mandelboxes",
    "/admin/events": "events",
}


def page_through(client: Any, path: str, headers: dict[str, str], key: str, **params: Any) -> list[dict[str, Any]]:
    """Every row of a list, following next_cursor; each page holds at most `limit` rows."""
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(100):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = client.get(path, query_string=query, headers=headers)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        assert set(body) == {key, "next_cursor"}
        assert len(body[key]) <= params["limit"]
        rows += body[key]
        cursor = body["next_cursor"]
        if cursor is None:
            return rows
        assert body[key], "a page with a next_cursor is never empty"
    raise AssertionError("paging did not end")


def add_mandelboxes(db: Session, instance_name: str, count: int, *, start: datetime) -> None:
    # Several rows share each created_at, so only the (created_at, mandelbox_id) pair orders them.
    for n in range(count):
        db.add(
            Mandelbox(
                instance_name=instance_name,
                user_id=f"user-{n % 4}",
                status=MandelboxStatus.CONNECTING if n % 2 else MandelboxStatus.RUNNING,
                created_at=start + timedelta(seconds=n // 3),
            )
        )
    db.commit()


def test_every_list_pages_through_all_rows_exactly_once_in_order(
    admin_client: Any, admin_headers: dict[str, str], factories: Factories, db: Session
) -> None:
    for n in range(7):
        factories.image(region=("us-east-1", "eu-west-1", "ap-south-1")[n % 3], client_commit_hash=f"c{n}")
    names = [factories.instance(region=("us-east-1", "eu-west-1")[n % 2])[0].instance_name for n in range(9)]
    add_mandelboxes(db, names[0], 23, start=datetime(2026, 12, 1, 12, 0, tzinfo=UTC))
    for n in range(11):
        record_event(db, kind=EventKind.IMAGE_CHANGED, actor="test", detail={"n": n})
    db.commit()

    images = page_through(admin_client, "/admin/images", admin_headers, "images", limit=2)
    assert len(images) == 7
    assert [(i["region"], i["client_commit_hash"]) for i in images] == sorted(
        ((i["region"], i["client_commit_hash"]) for i in images), key=lambda pair: (pair[0], int(pair[1][1:]))
    )

    instances = page_through(admin_client, "/admin/instances", admin_headers, "instances", limit=4)
    keys = [(i["region"], i["instance_name"]) for i in instances]
    assert keys == sorted(keys) and sorted(i["instance_name"] for i in instances) == sorted(names)

    boxes = page_through(admin_client, "/admin/mandelboxes", admin_headers, "mandelboxes", limit=5)
    assert len(boxes) == 23 and len({b["mandelbox_id"] for b in boxes}) == 23
    order = [(b["created_at"], uuid.UUID(b["mandelbox_id"])) for b in boxes]
    assert order == sorted(order, reverse=True)  # newest first, ties broken by id

    # Filters still apply, page after page.
    running = page_through(
        admin_client, "/admin/mandelboxes", admin_headers, "mandelboxes", limit=3, status="RUNNING", user_id="user-0"
    )
    assert running and all(b["status"] == "RUNNING" and b["user_id"] == "user-0" for b in running)
    expected = db.query(Mandelbox).filter_by(status=MandelboxStatus.RUNNING, user_id="user-0").count()
    assert len(running) == expected

    events = page_through(admin_client, "/admin/events", admin_headers, "events", limit=3)
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    assert len(ids) == db.execute(text("SELECT count(*) FROM events")).scalar_one()


def test_a_page_that_holds_everything_has_no_next_cursor(
    admin_client: Any, admin_headers: dict[str, str], factories: Factories
) -> None:
    factories.image(client_commit_hash="only")
    body = admin_client.get("/admin/images?limit=1", headers=admin_headers).get_json()
    assert len(body["images"]) == 1 and body["next_cursor"] is None
    factories.image(client_commit_hash="second")
    body = admin_client.get("/admin/images?limit=1", headers=admin_headers).get_json()
    assert len(body["images"]) == 1 and body["next_cursor"]  # one more is behind it: say so


def _b64(document: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")


BAD_CURSORS: dict[str, Callable[[str], str]] = {
    "garbage": lambda _list: "not a cursor!",
    "non-base64 alphabet": lambda _list: "%%%%",
    "base64 of non-JSON": lambda _list: base64.urlsafe_b64encode(b"\xff\xfe{").decode(),
    "JSON list": lambda _list: _b64([1, 2]),
    "JSON string": lambda _list: _b64("events"),
    "missing key": lambda name: _b64({"v": 1, "list": name}),
    "extra key": lambda name: _b64({"v": 1, "list": name, "after": [1], "x": 1}),
    "wrong version": lambda name: _b64({"v": 2, "list": name, "after": [1]}),
    "another list's cursor": lambda name: encode_cursor("images" if name != "images" else "events", ["a", 1]),
    "wrong arity": lambda name: _b64({"v": 1, "list": name, "after": [1, 2, 3]}),
    "wrong types": lambda name: _b64(
        {"v": 1, "list": name, "after": [{"a": 1}] * {"images": 2, "instances": 2}.get(name, 1)}
    ),
    "booleans": lambda name: _b64({"v": 1, "list": name, "after": [True] * {"images": 2, "instances": 2}.get(name, 1)}),
    "floats": lambda name: _b64({"v": 1, "list": name, "after": [1.5] * {"images": 2, "instances": 2}.get(name, 1)}),
    "huge key part": lambda name: _b64(
        {"v": 1, "list": name, "after": ["x" * 300] * {"images": 2, "instances": 2}.get(name, 1)}
    ),
}


@pytest.mark.parametrize("bad", sorted(BAD_CURSORS))
@pytest.mark.parametrize("path", sorted(LISTS))
def test_a_bad_cursor_is_a_validation_error(
    admin_client: Any, admin_headers: dict[str, str], path: str, bad: str
) -> None:
    cursor = BAD_CURSORS[bad](LISTS[path])
    response = admin_client.get(path, query_string={"cursor": cursor}, headers=admin_headers)
    assert response.status_code == 400, (bad, response.get_json())
    assert response.get_json()["error"] == "VALIDATION_ERROR"


def test_a_mandelbox_cursor_must_name_an_existing_mandelbox(admin_client: Any, admin_headers: dict[str, str]) -> None:
    for after in (str(uuid.uuid4()), "not-a-uuid", str(uuid.uuid4()).upper()):
        cursor = encode_cursor("mandelboxes", [after])
        response = admin_client.get("/admin/mandelboxes", query_string={"cursor": cursor}, headers=admin_headers)
        assert response.status_code == 400 and response.get_json()["error"] == "VALIDATION_ERROR", after


@pytest.mark.parametrize(
    ("path", "maximum"),
    [("/admin/images", 5000), ("/admin/instances", 5000), ("/admin/mandelboxes", 5000), ("/admin/events", 1000)],
)
def test_limit_is_bounded_and_documented(
    admin_client: Any, admin_headers: dict[str, str], path: str, maximum: int
) -> None:
    for limit in (0, maximum + 1, "many"):
        response = admin_client.get(path, query_string={"limit": limit}, headers=admin_headers)
        assert response.status_code == 400 and response.get_json()["error"] == "VALIDATION_ERROR", limit
    assert admin_client.get(path, query_string={"limit": maximum}, headers=admin_headers).status_code == 200
    spec = admin_client.get("/openapi.json").get_json()
    parameters = {p["name"]: p for p in spec["paths"][path]["get"]["parameters"]}
    assert parameters["limit"]["schema"]["maximum"] == maximum
    assert "default" in parameters["limit"]["schema"] and "cursor" in parameters
    body_schema = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    ref = body_schema["$ref"].rsplit("/", 1)[-1]
    assert "next_cursor" in spec["components"]["schemas"][ref]["properties"]


def test_mandelbox_pages_on_sqlite_with_mixed_timestamp_forms(tmp_path: Path, settings: Settings) -> None:
    """The embedded default: rows written by the server default and by Python, several at one instant."""
    url = f"sqlite:///{tmp_path / 'paging.db'}"
    upgrade_to_head(url)
    engine = create_db_engine(Settings(**{**settings.model_dump(), "database_url": url}))
    factory = create_session_factory(engine)
    try:
        with factory() as session:
            session.add(
                Image(region="us-east-1", client_commit_hash="c", ami_id="a", instance_type="t", mandelbox_capacity=4)
            )
            session.add(
                Instance(
                    instance_name="i-1",
                    region="us-east-1",
                    client_commit_hash="c",
                    ami_id="a",
                    instance_type="t",
                    mandelbox_capacity=100,
                    live_mandelboxes=0,
                    status=InstanceStatus.ACTIVE,
                    host_secret_hash="x",
                )
            )
            session.commit()
            # created_at from CURRENT_TIMESTAMP ("YYYY-MM-DD HH:MM:SS", no fraction) ...
            for n in range(5):
                session.add(Mandelbox(instance_name="i-1", user_id=f"d{n}", status=MandelboxStatus.RUNNING))
            session.commit()
            # ... beside aware Python datetimes, whole seconds and fractions, several per instant.
            base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
            add_mandelboxes(session, "i-1", 12, start=base)
            add_mandelboxes(session, "i-1", 6, start=base + timedelta(microseconds=250_000))
            seen: list[uuid.UUID] = []
            cursor = None
            while True:
                page = list_mandelbox_views(session, limit=4, cursor=cursor)
                seen += [view.mandelbox_id for view in page.items]
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert len(seen) == 23 and len(set(seen)) == 23
            everything = list_mandelbox_views(session, limit=100).items
            assert [view.mandelbox_id for view in everything] == seen
    finally:
        engine.dispose()


def test_events_filter_by_kind_and_time_window_across_pages(
    admin_client: Any, admin_headers: dict[str, str], db: Session
) -> None:
    """`kind`, `since` and `until` select rows (sent again with every page's cursor, as fractal.client does)."""
    start = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    kinds = (EventKind.MANDELBOX_ASSIGNED, EventKind.ASSIGNMENT_REFUSED, EventKind.IMAGE_CHANGED)
    for n in range(30):
        db.add(Event(kind=str(kinds[n % 3]), actor=f"user-{n}", created_at=start + timedelta(minutes=n), detail={}))
    db.commit()
    window = {"since": (start + timedelta(minutes=5)).isoformat(), "until": (start + timedelta(minutes=20)).isoformat()}
    wanted = f"{EventKind.MANDELBOX_ASSIGNED},{EventKind.ASSIGNMENT_REFUSED}"
    rows = page_through(admin_client, "/admin/events", admin_headers, "events", limit=4, kind=wanted, **window)
    # minutes 5..19, kinds 0 and 1 of every three: n % 3 != 2
    assert [row["actor"] for row in rows] == [f"user-{n}" for n in range(19, 4, -1) if n % 3 != 2]
    assert {row["kind"] for row in rows} == {str(EventKind.MANDELBOX_ASSIGNED), str(EventKind.ASSIGNMENT_REFUSED)}
    everything = page_through(admin_client, "/admin/events", admin_headers, "events", limit=1000)
    assert len(everything) == 30  # no filter, no window: every row


@pytest.mark.parametrize(
    "params",
    [
        {"kind": "mandelbox.assigned,no.such.kind"},
        {"kind": ","},
        {"since": "2026-12-01T00:00:00"},  # no offset: ambiguous
        {"until": "yesterday"},
        {"since": "2026-12-02T00:00:00Z", "until": "2026-12-01T00:00:00Z"},
        {"kind": "x" * 2000},
    ],
)
def test_bad_event_filters_are_validation_errors(
    admin_client: Any, admin_headers: dict[str, str], params: dict[str, str]
) -> None:
    response = admin_client.get("/admin/events", query_string=params, headers=admin_headers)
    assert response.status_code == 400, (params, response.get_json())
    assert response.get_json()["error"] == "VALIDATION_ERROR"
