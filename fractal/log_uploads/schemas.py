"""Log upload API bodies (uploads themselves are raw request bodies)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from fractal.models import LogSender


class LogStoredOut(BaseModel):
    key: str
    size: int


class LogOut(BaseModel):
    key: str
    sender: LogSender
    size: int
    uploaded_at: datetime
    url: str


class LogListOut(BaseModel):
    logs: list[LogOut]
