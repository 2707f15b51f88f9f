"""Read models of the fleet: one shape per resource, built from query rows by column name.

The admin and public APIs answer these (the owner's view of a mandelbox is the same model less ``user_id``),
so a column added here reaches every answer and the OpenAPI spec at once.
"""

from __future__ import annotations

import uuid
from typing import Any, Self

from pydantic import BaseModel, ConfigDict
from sqlalchemy import ColumnElement, Row, Select, select
from sqlalchemy.orm import Session, aliased

from fractal.clock import Timestamp
from fractal.errors import ValidationError
from fractal.models import EndReason, Heartbeat, Instance, InstanceStatus, Mandelbox, MandelboxStatus
from fractal.pagination import Page, SortKey, after_key, decode_cursor, fetch_page

__all__ = [
    "InstanceView",
    "MandelboxView",
    "get_mandelbox_view",
    "instance_view_query",
    "list_mandelbox_views",
    "mandelbox_view_query",
]


class _ReadModel(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)

    @classmethod
    def from_row(cls, row: Row[Any]) -> Self:
        """Built by column name (``row.region``), never by position."""
        return cls.model_validate(row)


class MandelboxView(_ReadModel):
    """A mandelbox with where it runs (the admin view; the owner's leaves out ``user_id``)."""

    mandelbox_id: uuid.UUID
    instance_name: str
    region: str
    ip: str | None
    user_id: str
    session_id: str | None
    status: MandelboxStatus
    created_at: Timestamp
    ended_at: Timestamp | None
    end_reason: EndReason | None


class InstanceView(_ReadModel):
    """An instance with its live usage and last heartbeat (the admin view)."""

    instance_name: str
    cloud_provider_id: str | None
    region: str
    client_commit_hash: str
    ami_id: str
    instance_type: str
    ip: str | None
    status: InstanceStatus
    mandelbox_capacity: int
    live_mandelboxes: int
    last_heartbeat_at: Timestamp | None
    created_at: Timestamp
    status_changed_at: Timestamp


def mandelbox_view_query() -> Select[*tuple[Any, ...]]:
    """The columns of ``MandelboxView``, by name."""
    return select(
        Mandelbox.mandelbox_id,
        Mandelbox.instance_name,
        Instance.region,
        Instance.ip,
        Mandelbox.user_id,
        Mandelbox.session_id,
        Mandelbox.status,
        Mandelbox.created_at,
        Mandelbox.ended_at,
        Mandelbox.end_reason,
    ).join(Instance, Instance.instance_name == Mandelbox.instance_name)


def instance_view_query() -> Select[*tuple[Any, ...]]:
    """The columns of ``InstanceView``, by name."""
    return select(
        Instance.instance_name,
        Instance.cloud_provider_id,
        Instance.region,
        Instance.client_commit_hash,
        Instance.ami_id,
        Instance.instance_type,
        Instance.ip,
        Instance.status,
        Instance.mandelbox_capacity,
        Instance.live_mandelboxes,
        Heartbeat.last_heartbeat_at,
        Instance.created_at,
        Instance.status_changed_at,
    ).outerjoin(Heartbeat, Heartbeat.instance_name == Instance.instance_name)


def get_mandelbox_view(session: Session, *, mandelbox_id: uuid.UUID) -> MandelboxView | None:
    """One mandelbox, None when absent."""
    row = session.execute(mandelbox_view_query().where(Mandelbox.mandelbox_id == mandelbox_id)).first()
    return MandelboxView.from_row(row) if row is not None else None


MANDELBOXES_LIST = "mandelboxes"
MANDELBOX_ORDER = (SortKey(Mandelbox.created_at, descending=True), SortKey(Mandelbox.mandelbox_id, descending=True))


def list_mandelbox_views(
    session: Session,
    *,
    user_id: str | None = None,
    status: MandelboxStatus | None = None,
    instance_name: str | None = None,
    limit: int = 500,
    cursor: str | None = None,
) -> Page[MandelboxView]:
    """One page of mandelboxes, newest first, filtered (admin view).

    Raises:
        ValidationError: ``cursor`` is not a cursor of this list, or names a mandelbox that does not exist.
    """
    query = mandelbox_view_query()
    if user_id is not None:
        query = query.where(Mandelbox.user_id == user_id)
    if status is not None:
        query = query.where(Mandelbox.status == status)
    if instance_name is not None:
        query = query.where(Mandelbox.instance_name == instance_name)
    if cursor is not None:
        query = query.where(_after_mandelbox(session, cursor))
    return fetch_page(
        session,
        query,
        keys=MANDELBOX_ORDER,
        limit=limit,
        list_name=MANDELBOXES_LIST,
        convert=MandelboxView.from_row,
        key_of=lambda view: (str(view.mandelbox_id),),
    )


def _after_mandelbox(session: Session, cursor: str) -> ColumnElement[bool]:
    """Rows after the cursor's mandelbox in (created_at, mandelbox_id) descending order.

    The cursor carries only the last row's id (rows are never deleted); its created_at is read back from the row
    inside the statement, so the comparison is the stored value against stored values exactly as ORDER BY sees
    them, whatever form a backend keeps timestamps in (SQLite's text forms, aware or naive), and no time value
    has to survive a round trip through the cursor.
    """
    (text_id,) = decode_cursor(cursor, list_name=MANDELBOXES_LIST, key_types=(str,))
    try:
        anchor_id = uuid.UUID(str(text_id))
    except ValueError:
        raise ValidationError("The cursor is not valid.", details={"query": {"cursor": ["unknown row"]}}) from None
    if str(anchor_id) != text_id or session.get(Mandelbox, anchor_id) is None:
        raise ValidationError("The cursor is not valid.", details={"query": {"cursor": ["unknown row"]}})
    anchor = aliased(Mandelbox)
    anchor_created_at = select(anchor.created_at).where(anchor.mandelbox_id == anchor_id).scalar_subquery()
    return after_key(MANDELBOX_ORDER, (anchor_created_at, anchor_id))
