"""Time in Fractal: one column type that stores UTC on every backend, and the clocks.

Decisions that compare a stored time with "now" (a host silent for too long, an unclaimed mandelbox, a boot
timeout, the scale-down delay, an expired idempotency key) use the database's clock, ``db_now()`` in SQL or
``database_now(session)`` once per pass, never the calling process's: the rows were written by other
processes on other machines, whose clocks may differ from ours by minutes. ``utcnow()`` is the process clock,
for what only this process sees (durations, log lines, tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import PlainSerializer
from sqlalchemy import ColumnElement, DateTime, Float, event, select
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeDecorator

from fractal.database import DriverStatement


def utcnow() -> datetime:
    """The calling process's clock, timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC; a naive value is taken to be UTC already (that is how every backend stores them)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def format_timestamp(value: datetime) -> str:
    """The one RFC 3339 form every answer uses: UTC, microseconds, ``Z`` (``2026-12-01T18:56:18.412357Z``)."""
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Every time in every answer: RFC 3339, UTC, microseconds, "Z" (the contract's section 12). Pydantic fields use it.
Timestamp = Annotated[datetime, PlainSerializer(format_timestamp, return_type=str, when_used="json")]


class UtcDateTime(TypeDecorator[datetime]):
    """``timestamptz`` on Postgres, text on SQLite; values go in as UTC and always come out timezone-aware UTC.

    SQLite has no time zone type: without this, it hands back naive datetimes (and a server default's
    ``CURRENT_TIMESTAMP`` is naive UTC text), which cannot be compared with the aware ones the code makes.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"UtcDateTime takes datetime values, not {type(value).__name__}")
        if value.tzinfo is None:
            # A naive value reaching the database is a bug in the caller: refuse it rather than guess its zone.
            raise ValueError("naive datetime given to a UTC column; use fractal.clock.utcnow() or an aware value")
        utc = value.astimezone(UTC)
        # SQLite's DATETIME text drops the offset; write UTC wall time so text order is time order.
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return as_utc(value)


class db_now(FunctionElement[datetime]):
    """The database's clock in a statement, optionally ``offset_s`` seconds away: ``now()`` on Postgres (the
    transaction's start, so one transaction sees one instant), millisecond UTC text on SQLite (its
    CURRENT_TIMESTAMP has whole seconds only)."""

    type = UtcDateTime()
    # Cacheable: the two attributes that change the SQL are part of the cache key (compiled SQL is cached per
    # engine, so a virtual clock on one engine never leaks into another's statements).
    _traverse_internals = [
        *FunctionElement._traverse_internals,
        ("offset_s", InternalTraversal.dp_plain_obj),
        ("live", InternalTraversal.dp_boolean),
    ]
    inherit_cache = True
    name = "db_now"

    def __init__(self, offset_s: float = 0.0, *, live: bool = False) -> None:
        super().__init__()
        self.offset_s = float(offset_s)  # a number we render ourselves: never text from outside
        # live: this statement's own time rather than the transaction's start (a lease checked late in a long
        # transaction must see the time pass).
        self.live = live


@compiles(db_now)
def _db_now_default(element: db_now, _compiler: SQLCompiler, **_kw: Any) -> str:
    clock = "statement_timestamp()" if element.live else "CURRENT_TIMESTAMP"
    if not element.offset_s:
        return clock
    return f"({clock} + make_interval(secs => {element.offset_s!r}))"


# The SQL function a virtual clock registers on a SQLite engine (the simulator's); see attach_virtual_clock.
VIRTUAL_CLOCK_FUNCTION = "fractal_virtual_now"
_VIRTUAL_CLOCK_FLAG = "fractal_virtual_clock"
SQLITE_TEXT_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: SQLCompiler, **_kw: Any) -> str:
    base = f"{VIRTUAL_CLOCK_FUNCTION}()" if getattr(compiler.dialect, _VIRTUAL_CLOCK_FLAG, False) else "'now'"
    if not element.offset_s:
        return f"strftime('%Y-%m-%d %H:%M:%f', {base})"
    return f"strftime('%Y-%m-%d %H:%M:%f', {base}, '{element.offset_s:+.6f} seconds')"


def attach_virtual_clock(engine: Engine, now: Callable[[], datetime]) -> None:
    """Make ``now()`` the database's clock on a SQLite ``engine``: every ``db_now()`` (hence ``database_now``) reads
    it, so the code that compares stored times with "now" runs unchanged on simulated time (the simulator).

    Column defaults written as ``CURRENT_TIMESTAMP`` are SQLite's own clock: a schema for a virtual clock is made
    with :func:`virtual_clock_ddl` rewriting them.
    """
    if engine.dialect.name != "sqlite":
        raise ValueError("a virtual clock needs a SQLite engine")

    last: list[Any] = [None, ""]  # the last instant and its text: SQLite calls this per row of some statements

    def clock_text() -> str:
        instant = now()
        if instant != last[0]:
            last[:] = [instant, as_utc(instant).strftime(SQLITE_TEXT_FORMAT)]
        return str(last[1])

    @event.listens_for(engine, "connect")
    def _register(dbapi_connection: Any, _record: Any) -> None:
        # Deterministic: the clock does not move while a statement runs (the caller moves it between statements),
        # so SQLite may read it once per execution instead of once per use and row, as it reads its own 'now'.
        # Each execution reads it afresh, prepared statements too (constant expressions are computed when a
        # statement starts, not when it is prepared).
        dbapi_connection.create_function(VIRTUAL_CLOCK_FUNCTION, 0, clock_text, deterministic=True)

    setattr(engine.dialect, _VIRTUAL_CLOCK_FLAG, True)


def virtual_clock_ddl(statement: str) -> str:
    """A CREATE TABLE statement whose ``CURRENT_TIMESTAMP`` defaults read the virtual clock instead."""
    return statement.replace(
        "DEFAULT (CURRENT_TIMESTAMP)", f"DEFAULT (strftime('%Y-%m-%d %H:%M:%f', {VIRTUAL_CLOCK_FUNCTION}()))"
    ).replace("DEFAULT CURRENT_TIMESTAMP", f"DEFAULT (strftime('%Y-%m-%d %H:%M:%f', {VIRTUAL_CLOCK_FUNCTION}()))")


# Built once: building the statement cost more than running it (every scaler pass and sweep reads the clock).
_DATABASE_NOW = DriverStatement(select(db_now()))


def database_now(session: Session) -> datetime:
    """The database's "now" (one round trip), for a pass that compares many stored times with one instant."""
    value = _DATABASE_NOW.execute(session).scalar_one()
    assert isinstance(value, datetime)
    return value


class seconds_between(FunctionElement[float]):
    """``later - earlier`` in seconds, in SQL: for ordering and comparing durations inside a statement (the lead-time
    median). Exact to the microsecond on Postgres; to the millisecond on SQLite (``julianday`` reads three digits of
    a second), so read the times themselves when the exact value matters."""

    type = Float()
    inherit_cache = True
    name = "seconds_between"

    def __init__(self, later: ColumnElement[datetime], earlier: ColumnElement[datetime]) -> None:
        super().__init__(later, earlier)


@compiles(seconds_between)
def _seconds_between_default(element: seconds_between, compiler: SQLCompiler, **kw: Any) -> str:
    later, earlier = element.clauses
    return f"EXTRACT(EPOCH FROM ({compiler.process(later, **kw)} - {compiler.process(earlier, **kw)}))"


@compiles(seconds_between, "sqlite")
def _seconds_between_sqlite(element: seconds_between, compiler: SQLCompiler, **kw: Any) -> str:
    later, earlier = element.clauses
    return f"((julianday({compiler.process(later, **kw)}) - julianday({compiler.process(earlier, **kw)})) * 86400.0)"
