"""Schemas shared by several APIs: the error body and the mandelbox representation."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from fractal.models import EndReason, MandelboxStatus


class ErrorOut(BaseModel):
    error: str
    message: str
    details: Any | None = None


class StrictIn(BaseModel):
    """Request bodies: no type coercion ("1" is not 1), unknown fields ignored for forward compatibility."""

    model_config = ConfigDict(strict=True, extra="ignore")


class MandelboxOut(BaseModel):
    mandelbox_id: uuid.UUID
    instance_name: str
    region: str
    ip: str | None
    session_id: str | None
    status: MandelboxStatus
    created_at: datetime
    ended_at: datetime | None
    end_reason: EndReason | None


class AdminMandelboxOut(MandelboxOut):
    user_id: str


class MandelboxListOut(BaseModel):
    mandelboxes: list[AdminMandelboxOut]
