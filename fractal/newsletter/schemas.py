"""Newsletter API bodies."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, EmailStr, StringConstraints

from fractal.models import SubscriptionStatus
from fractal.schemas import StrictIn


class SubscribeIn(StrictIn):
    email: Annotated[EmailStr, StringConstraints(max_length=320)]


class TokenQueryIn(BaseModel):
    # Missing or empty is simply an invalid token (400 INVALID_TOKEN), not a schema error.
    token: str = ""


class TokenIn(StrictIn):
    token: str


class SubscriptionStateOut(BaseModel):
    status: SubscriptionStatus


class EmptyOut(BaseModel):
    pass
