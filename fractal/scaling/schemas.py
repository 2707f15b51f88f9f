"""Scaling admin API bodies."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from fractal.clock import Timestamp


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
    target_reason: str = Field(
        description="Why target_free: static, demand, floor, ceiling, schedule (the image's buffer_policy), "
        "or inactive."
    )
    target_detail: dict[str, Any] = Field(description="The inputs of the decision (arrival rate, lead time, ...).")


class CapacityListOut(BaseModel):
    capacity: list[CapacityOut]


class ScalerActionOut(BaseModel):
    action: str
    instance_name: str | None
    region: str | None
    client_commit_hash: str | None
    detail: dict[str, Any]


class RegionErrorOut(BaseModel):
    region: str
    operation: str
    code: str | None
    message: str


class ReconcileOut(BaseModel):
    ran: bool
    skipped_reason: str | None
    started_at: Timestamp
    duration_s: float
    actions: list[ScalerActionOut]
    errors: list[str]
    region_errors: list[RegionErrorOut]
