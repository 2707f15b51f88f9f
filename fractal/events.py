"""The append-only audit log. Every lifecycle change, refusal and scaler decision is one row."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, select
from sqlalchemy.orm import Session

from fractal.database import DriverStatement
from fractal.models import Event
from fractal.pagination import Page, SortKey, after_key, decode_cursor, fetch_page


class EventKind(enum.StrEnum):
    INSTANCE_REGISTERED = "instance.registered"
    INSTANCE_LAUNCHED = "instance.launched"
    INSTANCE_ACTIVATED = "instance.activated"
    INSTANCE_RECONNECTED = "instance.reconnected"
    INSTANCE_CAPACITY_CHANGED = "instance.capacity_changed"
    INSTANCE_DRAINED = "instance.drained"
    INSTANCE_LOST = "instance.lost"
    INSTANCE_TERMINATING = "instance.terminating"
    INSTANCE_TERMINATED = "instance.terminated"
    IMAGE_CHANGED = "image.changed"
    MANDELBOX_ASSIGNED = "mandelbox.assigned"
    MANDELBOX_STATUS = "mandelbox.status"
    MANDELBOX_DELETED = "mandelbox.deleted"
    MANDELBOX_RELEASED = "mandelbox.released"
    ASSIGNMENT_REFUSED = "assignment.refused"
    HOST_REFUSED = "host.refused"
    SCALER_DECISION = "scaler.decision"
    SCALER_ERROR = "scaler.error"
    MAIL_SENT = "mail.sent"
    API_KEY_CREATED = "api_key.created"
    API_KEY_REVOKED = "api_key.revoked"
    API_KEY_REFUSED = "api_key.refused"  # a revoked or expired key was presented


# Built once, over the table (a Core insert: the same SQL as the ORM's, without its bulk-insert bookkeeping per
# statement, most of an event's CPU on SQLite): every assign records one, sweeps and the simulator many. They run
# on the session's connection: a Core statement gains nothing from the session's execute path but its CPU.
_events = cast(Table, Event.__table__)
_RECORD_EVENT = DriverStatement(
    insert(_events).values(
        kind=bindparam("p_kind"),
        actor=bindparam("p_actor"),
        instance_name=bindparam("p_instance_name"),
        mandelbox_id=bindparam("p_mandelbox_id", type_=_events.c.mandelbox_id.type),
        detail=bindparam("p_detail", type_=_events.c.detail.type),
    )
)


def record_event(
    session: Session,
    *,
    kind: EventKind | str,
    actor: str,
    instance_name: str | None = None,
    mandelbox_id: uuid.UUID | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add one event to the caller's transaction (the caller commits)."""
    _RECORD_EVENT.execute(
        session,
        {
            "p_kind": str(kind),
            "p_actor": actor,
            "p_instance_name": instance_name,
            "p_mandelbox_id": mandelbox_id,
            "p_detail": detail or {},
        },
    )


def record_events(session: Session, rows: list[dict[str, Any]]) -> None:
    """Add many events in one statement (set-based sweeps); each dict has record_event's fields."""
    if rows:
        _RECORD_EVENT.executemany(
            session,
            [
                {
                    "p_kind": str(row["kind"]),
                    "p_actor": row["actor"],
                    "p_instance_name": row.get("instance_name"),
                    "p_mandelbox_id": row.get("mandelbox_id"),
                    "p_detail": row.get("detail") or {},
                }
                for row in rows
            ],
        )


EVENTS_LIST = "events"
# Newest first by id: ids are handed out in the order rows are written, and unlike created_at they are unique.
EVENT_ORDER = (SortKey(Event.id, descending=True),)


def list_events(
    session: Session,
    *,
    limit: int = 100,
    cursor: str | None = None,
    kinds: Sequence[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
) -> Page[Event]:
    """One page of the audit log, newest first; only ``kinds`` when given, only rows written at or after
    ``since`` and before ``until`` when given (pass the same filters with every page's cursor).

    Raises:
        ValidationError: ``cursor`` is not a cursor of this list.
    """
    query = select(Event)
    if kinds:
        query = query.where(Event.kind.in_(list(kinds)))
    if since is not None:
        query = query.where(Event.created_at >= since)
    if until is not None:
        query = query.where(Event.created_at < until)
    if cursor is not None:
        (last_id,) = decode_cursor(cursor, list_name=EVENTS_LIST, key_types=(int,))
        query = query.where(after_key(EVENT_ORDER, (last_id,)))
    return fetch_page(
        session,
        query,
        keys=EVENT_ORDER,
        limit=limit,
        list_name=EVENTS_LIST,
        convert=lambda row: row[0],
        key_of=lambda event: (event.id,),
    )
