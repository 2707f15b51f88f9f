"""Scaling admin API bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class CapacityOut(BaseModel):
    region: str
    client_commit_hash: str
    active: bool
    instances: dict[str, int]
    capacity: int
    used: int
    free: int
    target_free: int
    live_mandelboxes: int


class CapacityListOut(BaseModel):
    capacity: list[CapacityOut]


class ScalerActionOut(BaseModel):
    action: str
    instance_name: str | None
    region: str | None
    client_commit_hash: str | None
    detail: dict[str, Any]


class ReconcileOut(BaseModel):
    ran: bool
    skipped_reason: str | None
    started_at: datetime
    duration_s: float
    actions: list[ScalerActionOut]
    errors: list[str]
