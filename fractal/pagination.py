"""Keyset pagination for the admin lists: `limit` rows per page, an opaque `cursor` in, `next_cursor` out.

A page is the rows strictly after the previous page's last row in the list's stable order (a unique sort key), so
rows inserted or changed between pages never shift the window: each row of the order is seen once. The cursor is
URL-safe base64 of a small JSON document naming the list and that last row's key; clients treat it as opaque.
Whatever a caller sends is checked strictly (base64 alphabet, JSON shape, list name, the type of each key part),
so a tampered cursor is a 400 ``VALIDATION_ERROR``, never a database error.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Select, and_, or_
from sqlalchemy.orm import QueryableAttribute, Session

from fractal.errors import ValidationError

T = TypeVar("T")
Row = TypeVar("Row")

CURSOR_VERSION = 1
# Key parts are names, hashes, ids or integers; anything longer is not a cursor this module wrote.
MAX_KEY_PART_CHARS = 255
MAX_CURSOR_CHARS = 1024
KeyPart = str | int


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list; ``next_cursor`` is None when nothing is behind it."""

    items: list[T]
    next_cursor: str | None


@dataclass(frozen=True)
class SortKey:
    """One column of a list's order; the last one (or the combination) must be unique."""

    column: QueryableAttribute[Any]
    descending: bool = False


def encode_cursor(list_name: str, key: Sequence[KeyPart]) -> str:
    """The opaque cursor that resumes ``list_name`` after the row whose sort key is ``key``."""
    document = {"v": CURSOR_VERSION, "list": list_name, "after": list(key)}
    raw = json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _invalid(reason: str) -> ValidationError:
    return ValidationError("The cursor is not valid.", details={"query": {"cursor": [reason]}})


def decode_cursor(cursor: str, *, list_name: str, key_types: Sequence[type[KeyPart]]) -> tuple[KeyPart, ...]:
    """The sort key a cursor of ``list_name`` carries, each part of the expected type.

    Raises:
        ValidationError: anything this module did not write for this list (400 VALIDATION_ERROR).
    """
    if not cursor or len(cursor) > MAX_CURSOR_CHARS:
        raise _invalid("must be a next_cursor this list answered")
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        document = json.loads(raw.decode("ascii"))
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _invalid("must be a next_cursor this list answered") from None
    if not isinstance(document, dict) or set(document) != {"v", "list", "after"}:
        raise _invalid("must be a next_cursor this list answered")
    if document["v"] != CURSOR_VERSION or document["list"] != list_name:
        raise _invalid("belongs to another list or version")
    key = document["after"]
    if not isinstance(key, list) or len(key) != len(key_types):
        raise _invalid("must be a next_cursor this list answered")
    for part, expected in zip(key, key_types, strict=True):
        # bool is an int subclass in Python; true/false is never a key part.
        if type(part) is not expected:
            raise _invalid("must be a next_cursor this list answered")
        if isinstance(part, str) and (len(part) > MAX_KEY_PART_CHARS or "\x00" in part):
            raise _invalid("must be a next_cursor this list answered")
    return tuple(key)


def after_key(keys: Sequence[SortKey], values: Sequence[Any]) -> ColumnElement[bool]:
    """Rows strictly after ``values`` in the order ``keys``: (k1 > v1) OR (k1 = v1 AND k2 > v2) OR ...

    Written out rather than as a row-value comparison so mixed directions work, on Postgres and SQLite alike.
    A value may be a SQL expression (a scalar subquery reading the anchor row), compared like the ORDER BY does.
    """
    clauses = []
    for index, (key, value) in enumerate(zip(keys, values, strict=True)):
        equal_before = [
            earlier.column == earlier_value for earlier, earlier_value in zip(keys[:index], values[:index], strict=True)
        ]
        step = key.column < value if key.descending else key.column > value
        clauses.append(and_(*equal_before, step))
    return or_(*clauses)


def fetch_page(
    session: Session,
    query: Select[Any],
    *,
    keys: Sequence[SortKey],
    limit: int,
    list_name: str,
    convert: Callable[[Any], Row],
    key_of: Callable[[Row], Sequence[KeyPart]],
) -> Page[Row]:
    """Run ``query`` (already filtered, and restricted to after the cursor) for one page of ``limit`` rows.

    One row more than asked for is read: its presence is what says another page exists.
    """
    ordered = query.order_by(*(key.column.desc() if key.descending else key.column.asc() for key in keys))
    rows = [convert(row) for row in session.execute(ordered.limit(limit + 1)).all()]
    if len(rows) <= limit:
        return Page(items=rows, next_cursor=None)
    items = rows[:limit]
    return Page(items=items, next_cursor=encode_cursor(list_name, key_of(items[-1])))
