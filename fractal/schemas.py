"""Schemas shared by several APIs: the error body and the mandelbox representation."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fractal.clock import Timestamp
from fractal.fleet.views import MandelboxView
from fractal.models import EndReason, MandelboxStatus


class ErrorOut(BaseModel):
    error: str
    message: str
    details: Any | None = None


def has_nul(value: Any) -> bool:
    """Whether a NUL character is anywhere in ``value`` (strings, dict keys and values, lists), which PostgreSQL
    text cannot hold."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(key) or has_nul(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return any(has_nul(item) for item in value)
    return False


class RequestIn(BaseModel):
    """Every request body and query string: no NUL characters anywhere (PostgreSQL text cannot hold them)."""

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        if has_nul(value):
            raise ValueError("must not contain NUL characters")
        return value


class StrictIn(RequestIn):
    """Request bodies: no type coercion ("1" is not 1), unknown fields ignored for forward compatibility."""

    model_config = ConfigDict(strict=True, extra="ignore")


class MandelboxOut(BaseModel):
    mandelbox_id: uuid.UUID
    instance_name: str
    region: str
    ip: str | None
    session_id: str | None
    status: MandelboxStatus
    created_at: Timestamp
    ended_at: Timestamp | None
    end_reason: EndReason | None


class MandelboxListOut(BaseModel):
    mandelboxes: list[MandelboxView]
    next_cursor: str | None = Field(
        default=None, description="Pass as cursor for the next page; null when no rows are behind this page."
    )
