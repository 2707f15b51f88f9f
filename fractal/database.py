"""Engine and session plumbing. Nothing connects at import time: engines are built from Settings on demand."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, InvalidatePoolError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, StaticPool

from fractal.config import Settings

SessionFactory = sessionmaker[Session]


def create_db_engine(settings: Settings, **overrides: object) -> Engine:
    """Build the engine for ``settings.database_url`` (psycopg2 for Postgres, WAL-mode file for SQLite)."""
    url = settings.database_url
    if url.startswith("sqlite"):
        ensure_sqlite_directory(url)
        kwargs: dict[str, object] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
        if url == "sqlite:///:memory:":
            kwargs["poolclass"] = StaticPool
        kwargs.update(overrides)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        # Usually unneeded: the transaction bounds sent on every checkout (below) already find a connection that
        # died with the server and replace it, at no extra cost.
        "pool_pre_ping": settings.db_pool_pre_ping,
        "pool_timeout": settings.db_pool_timeout_s,
        # A dead server must fail fast (503 DATABASE_UNAVAILABLE), not hang a worker.
        "connect_args": {"connect_timeout": 3, "application_name": "fractal"},
    }
    kwargs.update(overrides)
    engine = create_engine(url, **kwargs)
    install_transaction_bounds(engine, settings)
    return engine


# Set on a pooled connection's info while the transaction opened at checkout (bounds already set) is unused.
_BOUNDED_AT_CHECKOUT = "fractal_bounded_at_checkout"


def transaction_bounds_sql(settings: Settings) -> str:
    """The statement that bounds one transaction's lock waits, statements and idle time (one round trip)."""
    return (
        f"SET LOCAL lock_timeout = {int(settings.db_lock_timeout_ms)};"
        f" SET LOCAL statement_timeout = {int(settings.db_statement_timeout_ms)};"
        f" SET LOCAL idle_in_transaction_session_timeout = {int(settings.db_idle_in_transaction_timeout_ms)}"
    )


def install_transaction_bounds(engine: Engine, settings: Settings) -> None:
    """Bound every transaction on ``engine`` with ``SET LOCAL``, and replace dead pooled connections on checkout.

    Why ``SET LOCAL`` per transaction rather than libpq ``options`` or a session ``SET``: behind PgBouncer in
    transaction-pooling mode a session setting sticks to whichever server connection ran it (and ``options`` is
    refused), while a ``SET LOCAL`` travels with its transaction. The statement runs at pool checkout, where it
    also opens the transaction the caller's first statement would have opened anyway, so it costs one round trip
    per checkout and doubles as a liveness check: when it finds the connection dead (the database restarted),
    the pool is invalidated and the checkout retried on a fresh connection, so the request that found the dead
    connection still succeeds (SQLAlchemy's pre-ping would cost a round trip of its own). A second transaction
    on the same checked-out connection is bounded when it begins.
    """
    bounds = transaction_bounds_sql(settings)
    dialect = engine.dialect

    @event.listens_for(engine, "checkout")
    def _bound_at_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(bounds)  # psycopg2 opens the transaction (BEGIN) before it
        except dialect.loaded_dbapi.Error as error:
            if dialect.is_disconnect(error, dbapi_connection, cursor):
                raise InvalidatePoolError(str(error)) from error
            raise
        finally:
            cursor.close()
        record.info[_BOUNDED_AT_CHECKOUT] = True

    @event.listens_for(engine, "begin")
    def _bound_later_transactions(connection: Connection) -> None:
        if connection.connection.info.pop(_BOUNDED_AT_CHECKOUT, False):
            return  # the checkout's transaction is the one beginning: already bounded
        connection.exec_driver_sql(bounds)

    @event.listens_for(engine, "checkin")
    def _forget(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info.pop(_BOUNDED_AT_CHECKOUT, None)


def ensure_sqlite_directory(url: str) -> None:
    """SQLite creates the file but not its folder (the embedded default lives in instance/)."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_session_factory(engine: Engine) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit (views serialize after the service commits)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: SessionFactory) -> Iterator[Session]:
    """A session for work outside a request (scaler, CLI); rolled back on error, always closed."""
    session = factory()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for a Postgres advisory lock named ``name``."""
    value = zlib.crc32(name.encode()) | (zlib.crc32(name[::-1].encode()) << 32)
    return value - (1 << 64) if value >= (1 << 63) else value


def is_postgres(bind: Session | Connection | Engine) -> bool:
    return (
        bind.get_bind().dialect.name == "postgresql"
        if isinstance(bind, Session)
        else (bind.dialect.name == "postgresql")
    )


def try_advisory_xact_lock(session: Session, name: str) -> bool:
    """Take a transaction-scoped advisory lock without waiting; True when acquired (always on SQLite)."""
    if not is_postgres(session):
        return True
    got = session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": advisory_key(name)}).scalar()
    return bool(got)


def advisory_xact_lock(session: Session, name: str) -> None:
    """Wait for a transaction-scoped advisory lock (no-op on SQLite, which serialises writers anyway)."""
    if is_postgres(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key(name)})


def run_in_own_transaction(engine: Engine, sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
    """Run one statement (driver SQL, pyformat parameters) on a pooled DBAPI connection, in a transaction of its
    own that commits here; its first row, None when it answers none.

    Without the ORM session and SQLAlchemy's compile and result machinery (their CPU is most of a short request's
    database work in the worker); the pool's checkout still opens the transaction with its bounds. Driver errors
    are raised as SQLAlchemy's, as on a session; a connection found dead is invalidated, never pooled again.
    """
    dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
    try:
        connection = engine.raw_connection()  # the checkout hook sends the transaction bounds
    except dbapi_error as error:
        raise DBAPIError.instance(None, None, error, dbapi_error) from error
    try:
        cursor = connection.cursor()
        try:
            cursor.execute(sql, params)
            fetched = cursor.fetchone()
        finally:
            cursor.close()
        connection.commit()
        return tuple(fetched) if fetched is not None else None
    except dbapi_error as error:
        lost = engine.dialect.is_disconnect(error, connection.dbapi_connection, None)  # type: ignore[arg-type]
        if lost:
            connection.invalidate(error)
        else:
            with suppress(dbapi_error):
                connection.rollback()
        raise DBAPIError.instance(sql, params, error, dbapi_error, connection_invalidated=lost) from error
    finally:
        connection.close()  # back to the pool (an ended transaction: its reset sends nothing)
