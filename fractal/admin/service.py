"""Operator views of the fleet."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from fractal.models import Heartbeat, Instance, InstanceStatus


@dataclass(frozen=True)
class InstanceView:
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
    last_heartbeat_at: datetime | None
    created_at: datetime
    status_changed_at: datetime


def _instance_view_query() -> Select[*tuple[Any, ...]]:
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


def list_instance_views(
    session: Session, *, region: str | None = None, status: InstanceStatus | None = None
) -> list[InstanceView]:
    """Instances with live usage and last heartbeat, by region then name."""
    query = _instance_view_query()
    if region is not None:
        query = query.where(Instance.region == region)
    if status is not None:
        query = query.where(Instance.status == status)
    rows = session.execute(query.order_by(Instance.region, Instance.instance_name)).all()
    return [InstanceView(*row) for row in rows]


def get_instance_view(session: Session, *, instance_name: str) -> InstanceView | None:
    row = session.execute(_instance_view_query().where(Instance.instance_name == instance_name)).first()
    return InstanceView(*row) if row is not None else None
