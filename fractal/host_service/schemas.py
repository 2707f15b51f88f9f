"""Host-service API bodies, with caps so a broken or hostile host cannot send unbounded data."""

from __future__ import annotations

import ipaddress
import json
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints, field_validator

from fractal.models import InstanceStatus, MandelboxStatus
from fractal.schemas import StrictIn

# A heartbeat lists at most this many mandelboxes (images allow up to 10 000 per instance; real hosts run a few).
MAX_REPORTED_MANDELBOXES = 2048
# Whole heartbeat body, checked before parsing (413 PAYLOAD_TOO_LARGE); metrics alone, once parsed (400).
MAX_HEARTBEAT_BYTES = 256 * 1024
MAX_METRICS_BYTES = 16 * 1024
MAX_METRICS_KEYS = 128

InstanceName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class HandshakeIn(StrictIn):
    instance_name: InstanceName
    ip: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(description="IPv4 or IPv6 address")
    client_commit_hash: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    mandelbox_capacity: int = Field(ge=1, le=10_000)

    @field_validator("ip")
    @classmethod
    def _valid_ip(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError as exc:
            raise ValueError("must be an IPv4 or IPv6 address") from exc


class HandshakeOut(BaseModel):
    status: InstanceStatus
    heartbeat_interval_s: float


class ReportedMandelbox(StrictIn):
    # Not strict: JSON carries UUIDs and states as strings.
    mandelbox_id: uuid.UUID = Field(strict=False)
    status: MandelboxStatus = Field(strict=False)


class HeartbeatIn(StrictIn):
    instance_name: InstanceName
    mandelboxes: list[ReportedMandelbox] = Field(default_factory=list, max_length=MAX_REPORTED_MANDELBOXES)
    metrics: dict[str, Any] = Field(default_factory=dict, description="Free-form host metrics (at most 16 KiB)")

    @field_validator("metrics")
    @classmethod
    def _small_metrics(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) > MAX_METRICS_KEYS:
            raise ValueError(f"at most {MAX_METRICS_KEYS} keys")
        if len(json.dumps(value, separators=(",", ":"))) > MAX_METRICS_BYTES:
            raise ValueError(f"at most {MAX_METRICS_BYTES} bytes once serialized")
        return value


class HeartbeatOut(BaseModel):
    status: InstanceStatus
    heartbeat_interval_s: float
    stop_mandelboxes: list[uuid.UUID]


class MandelboxStatusIn(StrictIn):
    status: MandelboxStatus = Field(strict=False, description="CONNECTING, RUNNING, DYING or EXITED")


class HostMandelboxOut(BaseModel):
    mandelbox_id: uuid.UUID
    user_id: str
    session_id: str | None
    status: MandelboxStatus
