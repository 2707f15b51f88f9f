"""Time in Fractal: one aware-UTC "now" for the process and one column type that stores UTC on every backend."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    """The calling process's clock, timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC; a naive value is taken to be UTC already (that is how every backend stores them)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def format_timestamp(value: datetime) -> str:
    """The one RFC 3339 form every answer uses: UTC, microseconds, ``Z`` (``2026-12-01T18:56:18.412357Z``)."""
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
