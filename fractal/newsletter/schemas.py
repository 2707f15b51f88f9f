"""Newsletter API bodies."""

from __future__ import annotations

from pydantic import BaseModel

from fractal.mail.schemas import EmailAddress
from fractal.models import SubscriptionStatus
from fractal.schemas import StrictIn


class SubscribeIn(StrictIn):
    email: EmailAddress


class TokenQueryIn(BaseModel):
    # Missing or empty is simply an invalid token (400 INVALID_TOKEN), not a schema error.
    token: str = ""


class TokenIn(StrictIn):
    token: str


class SubscriptionStateOut(BaseModel):
    status: SubscriptionStatus


class EmptyOut(BaseModel):
    pass
