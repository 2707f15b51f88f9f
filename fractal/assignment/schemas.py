"""Public API request and response bodies."""

from __future__ import annotations

import uuid
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints

from fractal.models import MandelboxStatus
from fractal.schemas import StrictIn

RegionName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$")]


class AssignIn(StrictIn):
    regions: list[RegionName] = Field(min_length=1, max_length=20, description="Nearest first")
    client_commit_hash: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    session_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None


class AssignOut(BaseModel):
    mandelbox_id: uuid.UUID
    ip: str | None
    region: str
    instance_name: str
    status: MandelboxStatus


class RegionsOut(BaseModel):
    regions: list[str]
