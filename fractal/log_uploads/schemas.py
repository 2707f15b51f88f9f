"""Log upload API bodies (uploads themselves are raw request bodies)."""

from __future__ import annotations

from pydantic import BaseModel

from fractal.clock import Timestamp
from fractal.models import LogSender


class LogStoredOut(BaseModel):
    key: str
    size: int


class LogOut(BaseModel):
    key: str
    sender: LogSender
    size: int
    uploaded_at: Timestamp
    url: str


class LogListOut(BaseModel):
    logs: list[LogOut]
