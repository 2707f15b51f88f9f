"""DriverStatement: a Core statement run on the DBAPI cursor gives what SQLAlchemy's own execution gives — the same
typed values in and out, the same row count, the same errors — on Postgres and on SQLite, in the caller's
transaction; it refuses what it cannot do; and anything listening to the cursor events still sees its statements."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from sqlalchemy import Engine, Table, bindparam, event, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from fractal.clock import db_now
from fractal.config import Settings
from fractal.database import DriverStatement, create_db_engine, create_session_factory, in_values
from fractal.models import Base, Event, Mandelbox

_events = cast(Table, Event.__table__)
_mandelboxes = cast(Table, Mandelbox.__table__)

_INSERT_EVENT = DriverStatement(
    insert(_events).values(
        kind=bindparam("p_kind"),
        actor=bindparam("p_actor"),
        mandelbox_id=bindparam("p_mandelbox_id", type_=_events.c.mandelbox_id.type),
        detail=bindparam("p_detail", type_=_events.c.detail.type),
    )
)
_EVENTS_BY_ACTOR = (
    select(_events.c.id, _events.c.kind, _events.c.created_at, _events.c.mandelbox_id, _events.c.detail)
    .where(_events.c.actor == bindparam("p_actor"))
    .order_by(_events.c.id)
)
_READ_EVENTS = DriverStatement(_EVENTS_BY_ACTOR)
_RENAME_KIND = DriverStatement(
    update(_events)
    .where(_events.c.actor == bindparam("p_actor"), _events.c.kind == "test.before")
    .values(kind="test.after")
)


@pytest.fixture
def session(session_on_each_backend: Session) -> Session:
    return session_on_each_backend


def _insert(session: Session, actor: str, kind: str = "test.before", **detail: Any) -> uuid.UUID:
    mandelbox_id = uuid.uuid4()
    _INSERT_EVENT.execute(
        session, {"p_kind": kind, "p_actor": actor, "p_mandelbox_id": mandelbox_id, "p_detail": dict(detail)}
    )
    return mandelbox_id


def test_values_go_in_and_come_out_typed_as_sqlalchemy_gives_them(session: Session) -> None:
    first = _insert(session, "driver-test", n=1, nested={"a": [1, 2]})
    second = _insert(session, "driver-test", n=2)
    rows = _READ_EVENTS.execute(session, {"p_actor": "driver-test"}).rows
    expected = session.execute(_EVENTS_BY_ACTOR, {"p_actor": "driver-test"}).all()
    assert [tuple(row) for row in rows] == [tuple(row) for row in expected]
    assert type(rows[0]).__name__ == "DriverRow"  # the driver's path was taken (nothing listens here)
    assert [row.mandelbox_id for row in rows] == [first, second]  # UUIDs, by column name
    assert rows[0].detail == {"n": 1, "nested": {"a": [1, 2]}}  # JSON documents
    created = rows[0].created_at
    assert isinstance(created, datetime) and created.tzinfo is not None and created.utcoffset() == UTC.utcoffset(None)
    # A second execution reuses the compiled form and its processors.
    assert _READ_EVENTS.execute(session, {"p_actor": "driver-test"}).first() == rows[0]
    assert _READ_EVENTS.execute(session, {"p_actor": "nobody"}).first() is None


def test_row_count_and_literal_values(session: Session) -> None:
    _insert(session, "driver-count")
    _insert(session, "driver-count")
    _insert(session, "driver-count", kind="test.other")
    # The statement's own literals ("test.before", "test.after") travel as its defaults.
    assert _RENAME_KIND.execute(session, {"p_actor": "driver-count"}).rowcount == 2
    kinds = sorted(row.kind for row in _READ_EVENTS.execute(session, {"p_actor": "driver-count"}).rows)
    assert kinds == ["test.after", "test.after", "test.other"]
    count = DriverStatement(text("SELECT count(*) FROM events WHERE actor = :actor"))
    assert count.execute(session, {"actor": "driver-count"}).scalar() == 3


def test_executemany_writes_every_row(session: Session) -> None:
    ids = [uuid.uuid4() for _ in range(5)]
    _INSERT_EVENT.executemany(
        session,
        [
            {"p_kind": "test.many", "p_actor": "driver-many", "p_mandelbox_id": i, "p_detail": {"i": n}}
            for n, i in enumerate(ids)
        ],
    )
    rows = _READ_EVENTS.execute(session, {"p_actor": "driver-many"}).rows
    assert [(row.mandelbox_id, row.detail) for row in rows] == [(i, {"i": n}) for n, i in enumerate(ids)]


def test_driver_errors_are_sqlalchemys_and_the_transaction_recovers(session: Session) -> None:
    mandelbox_id = uuid.uuid4()
    insert_box = DriverStatement(
        insert(_mandelboxes).values(
            mandelbox_id=bindparam("p_id", type_=_mandelboxes.c.mandelbox_id.type),
            instance_name="no-such-instance",  # the foreign key refuses it
            user_id="u",
            status="ALLOCATED",
        )
    )
    savepoint = session.begin_nested()
    with pytest.raises(IntegrityError):
        insert_box.execute(session, {"p_id": mandelbox_id})
    savepoint.rollback()
    _insert(session, "driver-after-error")  # the transaction goes on
    assert len(_READ_EVENTS.execute(session, {"p_actor": "driver-after-error"}).rows) == 1


def test_what_it_cannot_do_is_refused_when_compiled(session: Session) -> None:
    with pytest.raises(ValueError, match="expand"):
        DriverStatement(select(_events.c.id).where(_events.c.kind.in_(bindparam("kinds", expanding=True)))).execute(
            session, {"kinds": ["a"]}
        )
    with pytest.raises(ValueError, match="default"):  # mandelbox_id's default is uuid.uuid4, run in Python
        DriverStatement(insert(_mandelboxes).values(instance_name="i", user_id="u", status="ALLOCATED")).execute(
            session
        )


def test_cursor_listeners_still_see_every_statement(session: Session) -> None:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    engine = session.get_bind()
    target = engine.engine if not isinstance(engine, Engine) else engine
    event.listen(target, "before_cursor_execute", record)
    try:
        first = _insert(session, "driver-listened")
        rows = _READ_EVENTS.execute(session, {"p_actor": "driver-listened"}).rows
    finally:
        event.remove(target, "before_cursor_execute", record)
    assert [row.mandelbox_id for row in rows] == [first]
    assert sum("INSERT INTO events" in s for s in seen) == 1 and sum("FROM events" in s for s in seen) == 1


def test_a_listener_on_the_connection_alone_still_sees_its_statements(session: Session) -> None:
    """Whether to look the listeners up is decided on SQLAlchemy's flag for any connection event listener, which a
    listener on one connection sets on that connection only (its engine has none on SQLite)."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    connection = session.connection()
    event.listen(connection, "before_cursor_execute", record)
    try:
        first = _insert(session, "driver-connection-listened")
        rows = _READ_EVENTS.execute(session, {"p_actor": "driver-connection-listened"}).rows
    finally:
        event.remove(connection, "before_cursor_execute", record)
    assert [row.mandelbox_id for row in rows] == [first]
    assert sum("INSERT INTO events" in s for s in seen) == 1 and sum("FROM events" in s for s in seen) == 1
    assert type(_READ_EVENTS.execute(session, {"p_actor": "driver-connection-listened"}).rows[0]).__name__ == (
        "DriverRow"  # removed: the driver's path again
    )


def test_a_lost_postgres_connection_is_invalidated_and_replaced(settings: Settings) -> None:
    """The backend killed under an open transaction: the statement raises SQLAlchemy's error for a lost connection
    (what the error handler answers 503 DATABASE_UNAVAILABLE), and the session's next transaction gets a fresh one."""
    engine = create_db_engine(settings)
    factory = create_session_factory(engine)
    try:
        with factory() as session:
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with engine.connect() as killer:
                killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                killer.commit()
            with pytest.raises(DBAPIError) as raised:
                _READ_EVENTS.execute(session, {"p_actor": "nobody"})
            assert raised.value.connection_invalidated
            session.rollback()
            assert _READ_EVENTS.execute(session, {"p_actor": "nobody"}).rows == []
            assert session.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        engine.dispose()


def test_in_values_matches_an_in_list_whatever_its_length(session: Session) -> None:
    ids = [_insert(session, "driver-in") for _ in range(4)]
    by_ids = DriverStatement(
        select(_events.c.mandelbox_id).where(in_values(_events.c.mandelbox_id, "ids")).order_by(_events.c.id)
    )
    for chosen in ([], ids[:1], ids[1:], [ids[2], uuid.uuid4()]):
        rows = by_ids.execute(session, {"ids": chosen}).rows
        expected = session.execute(
            select(_events.c.mandelbox_id).where(_events.c.mandelbox_id.in_(chosen)).order_by(_events.c.id)
        ).all()
        assert (
            [row.mandelbox_id for row in rows]
            == [row.mandelbox_id for row in expected]
            == [i for i in ids if i in chosen]
        )
    by_actor = select(func.count()).select_from(_events).where(in_values(_events.c.actor, "actors"))
    assert session.execute(by_actor, {"actors": ["driver-in", "nobody"]}).scalar_one() == 4  # SQLAlchemy's path too


def test_a_statement_compiles_for_each_engine_of_its_own() -> None:
    """The same statement on a SQLite engine with the simulator's virtual clock and on a plain one: each gets its
    own compiled form (the clock compiles differently), not the first one's."""
    from sqlalchemy import create_engine

    from fractal.clock import attach_virtual_clock

    instant = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    now = DriverStatement(select(db_now()))
    virtual = create_engine("sqlite://")
    attach_virtual_clock(virtual, lambda: instant)
    plain = create_engine("sqlite://")
    try:
        with virtual.connect() as connection:
            assert now.execute(connection).scalar() == instant
        with plain.connect() as connection:
            assert abs((now.execute(connection).scalar() - datetime.now(UTC)).total_seconds()) < 60
    finally:
        virtual.dispose()
        plain.dispose()


def test_the_virtual_clock_is_read_anew_by_every_execution_of_one_prepared_statement() -> None:
    """The virtual clock's SQL function is declared deterministic (SQLite then reads it once per execution of a
    statement, however many rows and uses): the same prepared statement run again reads it again."""
    from datetime import timedelta

    from sqlalchemy import create_engine

    from fractal.clock import attach_virtual_clock

    instant = [datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)]
    virtual = create_engine("sqlite://")
    attach_virtual_clock(virtual, lambda: instant[0])
    rows = select(db_now().label("a"), db_now().label("b")).select_from(
        text("(SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3)")
    )
    statement = DriverStatement(rows)
    try:
        with virtual.connect() as connection:
            first = statement.execute(connection).rows
            instant[0] += timedelta(seconds=5)
            second = statement.execute(connection).rows
    finally:
        virtual.dispose()
    assert len(first) == 3 and {value for row in first for value in row} == {datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)}
    assert {value for row in second for value in row} == {datetime(2030, 1, 2, 3, 4, 10, tzinfo=UTC)}


def test_constant_in_lists_are_rendered_once_and_caller_lists_refused(session: Session) -> None:
    for kind in ("test.a", "test.b", "test.c"):
        _insert(session, "driver-constants", kind=kind)
    of_two = select(_events.c.kind).where(
        _events.c.actor == bindparam("p_actor"), _events.c.kind.in_(["test.a", "test.c"])
    )
    rows = DriverStatement(of_two).execute(session, {"p_actor": "driver-constants"}).rows
    assert type(rows[0]).__name__ == "DriverRow"  # on the driver, the constants rendered into its SQL
    assert sorted(row.kind for row in rows) == ["test.a", "test.c"]
    # Without strict, what the driver cannot run (here a list the caller gives) runs through SQLAlchemy's path.
    callers = select(_events.c.kind).where(_events.c.kind.in_(bindparam("kinds", expanding=True)))
    loose = DriverStatement(callers, strict=False).execute(session, {"kinds": ["test.b"]}).rows
    assert [row.kind for row in loose] == ["test.b"]


def test_threads_first_running_one_statement_together_all_get_typed_rows(settings: Settings) -> None:
    """A threaded worker's first requests may run a statement's first execution at once: every thread gets its rows
    processed (no thread sees the rows' shape before their processors)."""
    import threading

    engine = create_db_engine(settings)
    factory = create_session_factory(engine)
    failures: list[BaseException] = []
    try:
        for _ in range(10):
            statement = DriverStatement(select(db_now(), bindparam("p_id", type_=_events.c.mandelbox_id.type)))
            wanted = uuid.uuid4()
            start = threading.Barrier(8)

            def run(
                statement: DriverStatement = statement, wanted: uuid.UUID = wanted, start: threading.Barrier = start
            ) -> None:
                try:
                    with factory() as session:
                        start.wait()
                        row = statement.execute(session, {"p_id": wanted}).one()
                        assert isinstance(row[0], datetime) and row[0].tzinfo is not None
                        assert row[1] == wanted
                except BaseException as error:  # reported below, from the test's thread
                    failures.append(error)

            threads = [threading.Thread(target=run) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
        assert failures == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_with_sqlalchemys_sql_log_on_every_statement_is_logged(
    backend: str, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator who turns on SQLAlchemy's SQL log (``sqlalchemy.engine`` at INFO) sees the driver's statements
    too: they take SQLAlchemy's path while it is on (SQLAlchemy logs on connections made after it was turned on)."""
    import logging

    url = settings.database_url if backend == "postgres" else "sqlite:///:memory:"
    engine = create_db_engine(Settings(**{**settings.model_dump(), "database_url": url}))
    if backend == "sqlite":
        Base.metadata.create_all(engine)
    engine_logger = logging.getLogger("sqlalchemy.engine")
    previous = engine_logger.level
    engine_logger.setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"), Session(engine) as session:
            mandelbox_id = _insert(session, "driver-logged")
            rows = _READ_EVENTS.execute(session, {"p_actor": "driver-logged"}).rows
            session.rollback()
    finally:
        engine_logger.setLevel(previous)
        engine.dispose()
    assert [row.mandelbox_id for row in rows] == [mandelbox_id]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "INSERT INTO events" in logged and "FROM events" in logged
