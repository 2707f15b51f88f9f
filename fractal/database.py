"""Engine and session plumbing. Nothing connects at import time: engines are built from Settings on demand."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

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
        "pool_size": 10,
        "max_overflow": 20,
        # No pre-ping: it costs a round trip on every checkout. A connection that died with the server fails its
        # request (503 DATABASE_UNAVAILABLE) and SQLAlchemy then invalidates the whole pool, so one request per
        # process pays for a restart instead of every request paying all the time.
        "pool_pre_ping": settings.db_pool_pre_ping,
        "pool_timeout": 5,
        # A dead server must fail fast (503 DATABASE_UNAVAILABLE), not hang a worker.
        "connect_args": {"connect_timeout": 3, "application_name": "fractal"},
    }
    kwargs.update(overrides)
    return create_engine(url, **kwargs)


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
