"""Bounded database waits: a held row lock, a runaway statement, a real deadlock or a real serialization failure
answers 503 DATABASE_BUSY (a backend terminated mid-transaction: 503 DATABASE_UNAVAILABLE) within the bound and
stores nothing; the bounds are per transaction (SET LOCAL, PgBouncer-safe); a connection that died with a database
restart is replaced without failing the request that finds it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from apiflask import APIBlueprint
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from alembic import command
from fractal.blueprints import PUBLIC_BLUEPRINTS
from fractal.cloud.base import CloudHost, HostRef
from fractal.cloud.memory import MemoryCloud
from fractal.config import Settings
from fractal.database import SessionFactory, create_db_engine, create_session_factory
from fractal.events import EventKind
from fractal.factory import create_app
from fractal.models import Event, Instance, InstanceStatus, Mandelbox
from fractal.scaling.reconcile import reconcile_fleet
from fractal.web import db_session
from test.conftest import create_database, run_alembic
from test.factories import Factories
from test.servers import throwaway_postgres

ASSIGN = {"regions": ["us-east-1"], "client_commit_hash": "abc123"}


def _live_rows(factory: SessionFactory) -> tuple[int, int]:
    with factory() as session:
        boxes = session.execute(select(func.count()).select_from(Mandelbox)).scalar_one()
        live = session.execute(select(func.coalesce(func.sum(Instance.live_mandelboxes), 0))).scalar_one()
        return boxes, live


def test_held_instance_lock_makes_assign_answer_database_busy_and_store_nothing(
    bounded_settings: Settings,
    bounded_engine: Engine,
    committed_factory: SessionFactory,
    user_headers: Callable[..., dict[str, str]],
) -> None:
    with committed_factory() as session:
        factories = Factories(session)
        factories.image()
        factories.instance()
    app = create_app(
        blueprints=PUBLIC_BLUEPRINTS, settings=bounded_settings, session_factory=create_session_factory(bounded_engine)
    )
    client = app.test_client()

    with bounded_engine.connect() as holder:
        # Another transaction holds the region's instance rows (a slow admin script, a stuck migration). Its own
        # idle bound ends it after 20 s at the latest, so without bounds on the request the assign below would
        # wait that long and then succeed: this test fails rather than hangs.
        holder.exec_driver_sql("SET LOCAL idle_in_transaction_session_timeout = 20000")
        holder.execute(text("SELECT instance_name FROM instances WHERE region = 'us-east-1' FOR UPDATE")).all()

        response = client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("blocked"))

        assert response.status_code == 503, response.json
        assert response.json["error"] == "DATABASE_BUSY"
        assert set(response.json) == {"error", "message"}
        assert int(response.headers["Retry-After"]) >= 1
        # The answer came while the lock was still held (the holder's transaction is still alive and owns it).
        assert holder.execute(text("SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid()")).scalar_one() > 0
        assert _live_rows(committed_factory) == (0, 0), "a refused assign stored a mandelbox"
        holder.rollback()

    response = client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("blocked"))
    assert response.status_code == 201, response.json
    assert _live_rows(committed_factory) == (1, 1)


def _probe_blueprint() -> APIBlueprint:
    """Routes that provoke one database failure each, through the request's session like any view."""
    bp = APIBlueprint("probe", __name__)
    statements = {
        "sleep": "SELECT pg_sleep(5)",  # past statement_timeout: 57014
        "bug": "SELECT 1 / 0",  # our own mistake: stays a 500
    }

    @bp.get("/probe/<name>")
    def probe(name: str) -> dict[str, Any]:
        if name == "locked":
            db_session().execute(text("SELECT 1 FROM instances FOR UPDATE NOWAIT")).all()  # 55P03
        elif name == "terminated":  # an operator (or a shutting-down server) ends this backend mid-query
            db_session().execute(text("SET LOCAL statement_timeout = 0"))
            db_session().execute(text("SELECT pg_sleep(10) /* fractal-probe-terminated */")).all()
        else:
            db_session().execute(text(statements[name])).all()
        return {"ok": True}

    @bp.get("/probe/bounds")
    def bounds() -> dict[str, Any]:
        session = db_session()
        names = ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")
        return {name: session.execute(text(f"SHOW {name}")).scalar_one() for name in names}

    return bp


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        ("sleep", 503, "DATABASE_BUSY"),
        # psycopg2 sees only "server closed the connection unexpectedly" (no SQLSTATE): a lost connection.
        ("terminated", 503, "DATABASE_UNAVAILABLE"),
        ("locked", 503, "DATABASE_BUSY"),
        ("bug", 500, "INTERNAL_ERROR"),
    ],
)
def test_database_trouble_maps_to_busy_and_bugs_stay_internal(
    bounded_settings: Settings, bounded_engine: Engine, name: str, status: int, code: str
) -> None:
    app = create_app(
        blueprints=[_probe_blueprint()],
        settings=bounded_settings,
        session_factory=create_session_factory(bounded_engine),
    )
    client = app.test_client()
    holder = None
    if name == "locked":
        with Session(bounded_engine) as session:
            Factories(session).instance()
        holder = bounded_engine.connect()
        holder.execute(text("SELECT 1 FROM instances FOR UPDATE")).all()
    killer = threading.Thread(target=_terminate_probe, args=(bounded_engine,)) if name == "terminated" else None
    if killer is not None:
        killer.start()
    try:
        response = client.get(f"/probe/{name}")
    finally:
        if holder is not None:
            holder.close()
        if killer is not None:
            killer.join()
    assert response.status_code == status, response.json
    assert response.json["error"] == code
    if status == 503:
        assert int(response.headers["Retry-After"]) >= 1
    # Whatever happened to that connection, the next request gets a working one.
    assert client.get("/probe/bounds").status_code == 200


def _terminate_probe(engine: Engine) -> None:
    """pg_terminate_backend the probe's backend once it is sleeping (as an operator would a stuck query)."""
    with engine.connect() as connection:
        for _ in range(200):
            pids = (
                connection.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                        " AND query LIKE '%fractal-probe-terminated%' AND query NOT LIKE '%pg_stat_activity%'"
                    )
                )
                .scalars()
                .all()
            )
            connection.commit()
            if pids:
                connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pids[0]})
                connection.commit()
                return
            time.sleep(0.05)


def test_bounds_hold_in_every_transaction_and_only_there(bounded_settings: Settings, bounded_engine: Engine) -> None:
    app = create_app(
        blueprints=[_probe_blueprint()],
        settings=bounded_settings,
        session_factory=create_session_factory(bounded_engine),
    )
    client = app.test_client()
    expected = {"lock_timeout": "300ms", "statement_timeout": "500ms", "idle_in_transaction_session_timeout": "5s"}
    assert client.get("/probe/bounds").json == expected
    assert client.get("/probe/bounds").json == expected  # a pooled connection, checked out again

    # A connection used for several transactions (the scaler's leader-lock connection does this) is bounded in each.
    with bounded_engine.connect() as connection:
        for _ in range(3):
            assert connection.exec_driver_sql("SHOW lock_timeout").scalar_one() == "300ms"
            connection.commit()

    # SET LOCAL, never a session SET: once the transaction ends the server's defaults are back, so behind
    # PgBouncer's transaction pooling no other client inherits them.
    raw = bounded_engine.raw_connection()
    try:
        raw.rollback()
        cursor = raw.cursor()
        cursor.execute("SHOW lock_timeout")
        assert cursor.fetchone() == ("0",)
        cursor.close()
        raw.rollback()
    finally:
        raw.close()


def test_healthz_answers_without_the_database(settings: Settings) -> None:
    unreachable = Settings(**{**settings.model_dump(), "database_url": "postgresql://nobody@127.0.0.1:1/none"})
    app = create_app(blueprints=PUBLIC_BLUEPRINTS, settings=unreachable)
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503


@pytest.mark.slow
def test_first_request_after_a_database_restart_succeeds(
    settings: Settings, user_headers: Callable[..., dict[str, str]]
) -> None:
    with throwaway_postgres() as server:
        url = create_database(server.url, "fractal")
        run_alembic(url, command.upgrade, "head")
        app_settings = Settings(**{**settings.model_dump(), "database_url": url, "max_mandelboxes_per_user": 1000})
        engine = create_db_engine(app_settings)
        factory = create_session_factory(engine)
        with factory() as session:
            factories = Factories(session)
            factories.image()
            factories.instance(mandelbox_capacity=100)
        client = create_app(blueprints=PUBLIC_BLUEPRINTS, settings=app_settings, session_factory=factory).test_client()
        headers = user_headers("restart-survivor")
        for _ in range(3):
            assert client.post("/mandelbox/assign", json=ASSIGN, headers=headers).status_code == 201

        server.stop("fast")
        server.start()

        # The very first request after the restart finds a dead pooled connection; it must not fail for it.
        for _ in range(3):
            response = client.post("/mandelbox/assign", json=ASSIGN, headers=headers)
            assert response.status_code == 201, response.json
        assert _live_rows(factory) == (6, 6)
        engine.dispose()


class _SlowCloud(MemoryCloud):
    """A cloud whose describe takes longer than the idle-in-transaction bound (EC2 with retries can)."""

    def describe(self, region: str, hosts: Sequence[HostRef]) -> list[CloudHost]:
        time.sleep(0.8)
        return super().describe(region, hosts)


def test_the_scaler_never_idles_in_a_transaction_across_cloud_calls(
    settings: Settings, committed_factory: SessionFactory
) -> None:
    scaler_settings = Settings(**{**settings.model_dump(), "db_idle_in_transaction_timeout_ms": 300})
    engine = create_db_engine(scaler_settings)
    factory = create_session_factory(engine)
    try:
        with factory() as session:
            factories = Factories(session)
            failing, _ = factories.instance(region="eu-west-1", status=InstanceStatus.TERMINATING)
            slow, _ = factories.instance(region="us-east-1", status=InstanceStatus.TERMINATING)
        cloud = _SlowCloud(failing_regions={"eu-west-1": "Unavailable"})

        # eu-west-1 fails first (an event is written), then us-east-1's describe takes 0.8 s: had either the read of
        # the TERMINATING rows or that event been left in an open transaction, the server would have ended it.
        report = reconcile_fleet(factory, settings=scaler_settings, cloud=cloud)

        assert report.ran
        assert [(e.region, e.operation) for e in report.region_errors] == [("eu-west-1", "terminate")]
        with factory() as session:
            statuses = dict(session.execute(select(Instance.instance_name, Instance.status)).all())
            scaler_errors = session.scalars(select(Event).where(Event.kind == EventKind.SCALER_ERROR)).all()
        assert statuses == {
            failing.instance_name: InstanceStatus.TERMINATING,
            slow.instance_name: InstanceStatus.TERMINATED,
        }
        assert len(scaler_errors) == 1
    finally:
        engine.dispose()


def test_an_exhausted_pool_answers_database_busy_within_its_timeout(
    settings: Settings, committed_factory: SessionFactory, user_headers: Callable[..., dict[str, str]]
) -> None:
    budget = Settings(**{**settings.model_dump(), "db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout_s": 0.5})
    engine = create_db_engine(budget)
    app = create_app(
        blueprints=list(PUBLIC_BLUEPRINTS), settings=budget, session_factory=create_session_factory(engine)
    )
    client = app.test_client()
    try:
        held = engine.connect()  # the whole budget, taken
        try:
            started = time.monotonic()
            answer = client.get("/regions", headers=user_headers())
            waited = time.monotonic() - started
        finally:
            held.close()
        assert answer.status_code == 503 and answer.json["error"] == "DATABASE_BUSY", answer.json
        assert answer.headers["Retry-After"]
        assert 0.4 <= waited < 3, waited  # the pool timeout, not a hang
        assert client.get("/regions", headers=user_headers()).status_code == 200  # the budget is back
    finally:
        engine.dispose()


# --- Conflicts provoked for real: a deadlock, a serialization failure, a backend terminated mid-transaction -------
# Each request writes first (a capacity change and an audit event, as a service would), then runs into the conflict
# another connection sets up; the answer is 503 with Retry-After and the write is gone.

MARK = "fractal-probe-conflict"


class _Conflict:
    """Two instance rows, A and B, and what the test's other connection did to them."""

    def __init__(self, engine: Engine) -> None:
        with Session(engine) as session:
            factories = Factories(session)
            self.a = factories.instance(mandelbox_capacity=4)[0].instance_name
            self.b = factories.instance(mandelbox_capacity=4)[0].instance_name
        self.engine = engine
        self.request_holds_a = threading.Event()

    def capacities(self) -> dict[str, int]:
        with Session(self.engine) as session:
            rows = session.execute(
                select(Instance.instance_name, Instance.mandelbox_capacity).where(
                    Instance.instance_name.in_([self.a, self.b])
                )
            ).all()
            return {name: capacity for name, capacity in rows}

    def marked_events(self) -> int:
        with Session(self.engine) as session:
            return session.execute(select(func.count()).select_from(Event).where(Event.actor == MARK)).scalar_one()


def _conflict_blueprint(conflict: _Conflict) -> APIBlueprint:
    bp = APIBlueprint("conflict", __name__)

    def write_a(session: Session) -> None:
        session.execute(
            text("UPDATE instances SET mandelbox_capacity = mandelbox_capacity + 10 WHERE instance_name = :a"),
            {"a": conflict.a},
        )
        session.add(Event(kind="probe", actor=MARK, instance_name=conflict.a, detail={}))
        session.flush()

    @bp.post("/conflict/deadlock")
    def deadlock() -> dict[str, Any]:
        session = db_session()
        # This transaction checks for deadlocks first (the other side waits 10 s before it would): it is the victim.
        session.execute(text("SET LOCAL deadlock_timeout = '100ms'"))
        write_a(session)
        conflict.request_holds_a.set()
        time.sleep(0.2)  # the other connection, holding B, now waits for A
        session.execute(
            text("UPDATE instances SET status_changed_at = now() WHERE instance_name = :b"), {"b": conflict.b}
        )
        session.commit()
        return {"ok": True}

    @bp.post("/conflict/serialization")
    def serialization() -> dict[str, Any]:
        session = db_session()
        session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        session.execute(text("SELECT mandelbox_capacity FROM instances WHERE instance_name = :a"), {"a": conflict.a})
        conflict.request_holds_a.set()  # the snapshot is taken
        time.sleep(0.3)  # meanwhile another transaction updates A and commits
        write_a(session)
        session.commit()
        return {"ok": True}

    @bp.get("/conflict/read")
    def read() -> dict[str, Any]:
        query = text("SELECT mandelbox_capacity FROM instances WHERE instance_name = :a")
        return {"capacity": db_session().execute(query, {"a": conflict.a}).scalar_one()}

    @bp.post("/conflict/terminated")
    def terminated() -> dict[str, Any]:
        session = db_session()
        write_a(session)
        session.execute(text("SET LOCAL statement_timeout = 0"))
        session.execute(text(f"SELECT pg_sleep(10) /* {MARK} */")).all()  # an operator ends this backend here
        session.commit()
        return {"ok": True}

    return bp


@pytest.fixture
def conflict(bounded_engine: Engine) -> _Conflict:
    return _Conflict(bounded_engine)


def _conflict_client(bounded_settings: Settings, bounded_engine: Engine, conflict: _Conflict) -> Any:
    # lock_timeout above deadlock_timeout here: the request must meet the deadlock, not give up waiting first.
    app_settings = Settings(**{**bounded_settings.model_dump(), "db_lock_timeout_ms": 3000})
    app = create_app(
        blueprints=[_conflict_blueprint(conflict)],
        settings=app_settings,
        session_factory=create_session_factory(bounded_engine),
    )
    return app.test_client()


def _assert_busy_and_nothing_written(response: Any, conflict: _Conflict, code: str, before: dict[str, int]) -> None:
    assert response.status_code == 503, response.json
    assert response.json["error"] == code and set(response.json) == {"error", "message"}, response.json
    assert int(response.headers["Retry-After"]) >= 1
    assert conflict.marked_events() == 0, "the refused request's audit event was stored"
    assert conflict.capacities()[conflict.a] == before[conflict.a], "the refused request's update was stored"


def test_a_real_deadlock_answers_database_busy_and_stores_nothing(
    bounded_settings: Settings, bounded_engine: Engine, conflict: _Conflict
) -> None:
    client = _conflict_client(bounded_settings, bounded_engine, conflict)
    before = conflict.capacities()
    deadlocks_before = _deadlocks(bounded_engine)
    other_finished = threading.Event()

    def other_side() -> None:
        # B first, then A: the opposite order. Survives the deadlock (the request is the victim) and commits.
        with bounded_engine.connect() as connection:
            connection.execute(text("SET LOCAL deadlock_timeout = '10s'"))
            connection.execute(text("SET LOCAL lock_timeout = '8s'"))
            connection.execute(
                text("UPDATE instances SET status_changed_at = now() WHERE instance_name = :b"), {"b": conflict.b}
            )
            if conflict.request_holds_a.wait(timeout=10):
                connection.execute(
                    text("UPDATE instances SET mandelbox_capacity = mandelbox_capacity + 1 WHERE instance_name = :a"),
                    {"a": conflict.a},
                )
                connection.commit()
                other_finished.set()

    other = threading.Thread(target=other_side)
    other.start()
    time.sleep(0.1)  # B is locked before the request starts
    try:
        started = time.monotonic()
        response = client.post("/conflict/deadlock")
        elapsed = time.monotonic() - started
    finally:
        other.join(timeout=15)
    _assert_busy_and_nothing_written(response, conflict, "DATABASE_BUSY", {conflict.a: before[conflict.a] + 1})
    assert other_finished.is_set(), "the other transaction should have won the deadlock and committed"
    assert elapsed < 3, elapsed  # deadlock detection, not a lock wait
    # Postgres itself broke a deadlock: it was real. A backend's statistics reach pg_stat_database at the latest
    # when it exits: close the pooled connections.
    bounded_engine.dispose()
    deadline = time.monotonic() + 5
    while _deadlocks(bounded_engine) == deadlocks_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _deadlocks(bounded_engine) > deadlocks_before


def _deadlocks(engine: Engine) -> int:
    with engine.connect() as connection:
        count: int = connection.execute(
            text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        ).scalar_one()
        return count


def test_a_real_serialization_failure_answers_database_busy_and_stores_nothing(
    bounded_settings: Settings, bounded_engine: Engine, conflict: _Conflict
) -> None:
    client = _conflict_client(bounded_settings, bounded_engine, conflict)
    before = conflict.capacities()

    def other_side() -> None:
        # Once the request's snapshot is taken, change A and commit: the request's update of A cannot serialize.
        if conflict.request_holds_a.wait(timeout=10):
            with bounded_engine.begin() as connection:
                connection.execute(
                    text("UPDATE instances SET mandelbox_capacity = mandelbox_capacity + 1 WHERE instance_name = :a"),
                    {"a": conflict.a},
                )

    other = threading.Thread(target=other_side)
    other.start()
    try:
        response = client.post("/conflict/serialization")
    finally:
        other.join(timeout=15)
    _assert_busy_and_nothing_written(response, conflict, "DATABASE_BUSY", {conflict.a: before[conflict.a] + 1})


def test_a_backend_terminated_mid_transaction_answers_database_unavailable_and_stores_nothing(
    bounded_settings: Settings, bounded_engine: Engine, conflict: _Conflict
) -> None:
    client = _conflict_client(bounded_settings, bounded_engine, conflict)
    before = conflict.capacities()

    def operator() -> None:
        with bounded_engine.connect() as connection:
            for _ in range(200):
                pid = connection.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE query LIKE :mark AND pid <> pg_backend_pid()"
                        " AND state = 'active'"
                    ),
                    {"mark": f"%pg_sleep(10) /* {MARK}%"},
                ).scalar()
                connection.commit()
                if pid is not None:
                    # The request has written A and an event, uncommitted: the operator ends its backend.
                    connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                    connection.commit()
                    return
                time.sleep(0.05)

    killer = threading.Thread(target=operator)
    killer.start()
    try:
        started = time.monotonic()
        response = client.post("/conflict/terminated")
        elapsed = time.monotonic() - started
    finally:
        killer.join(timeout=15)
    _assert_busy_and_nothing_written(response, conflict, "DATABASE_UNAVAILABLE", before)
    assert elapsed < 5, elapsed  # the termination ended it, not the 10 s sleep
    # The dead connection is not handed out again: the next request reads through a working one.
    assert client.get("/conflict/read").json == {"capacity": before[conflict.a]}
