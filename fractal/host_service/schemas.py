"""Host-service API bodies, with caps so a broken or hostile host cannot send unbounded data."""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints, field_validator

from fractal.models import InstanceStatus, MandelboxStatus
from fractal.schemas import StrictIn, has_nul  # has_nul: the same NUL check RequestIn applies to every field

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


@dataclass(frozen=True)
class HeartbeatReport:
    """A validated heartbeat body, as the view uses it."""

    instance_name: str
    mandelboxes: list[tuple[uuid.UUID, MandelboxStatus]]
    metrics: dict[str, Any]

    @classmethod
    def of(cls, body: HeartbeatIn) -> HeartbeatReport:
        return cls(body.instance_name, [(box.mandelbox_id, box.status) for box in body.mandelboxes], body.metrics)


_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_MANDELBOX_STATUSES = {str(status): status for status in MandelboxStatus}


def accept_heartbeat(data: Any) -> HeartbeatReport | None:
    """The body every host sends, checked by hand; None for anything else, which HeartbeatIn then judges.

    HeartbeatIn (pydantic) costs more CPU than the rest of the body's handling on this, the hottest route. This
    accepts only bodies HeartbeatIn accepts, with the same values (test/test_heartbeat_input.py compares the two
    on generated bodies): JSON types as given (no coercion), mandelbox ids in the hyphenated form, statuses by
    their exact names. Whatever it does not accept goes to HeartbeatIn, so every refusal keeps its answer.
    """
    if type(data) is not dict:
        return None
    name = data.get("instance_name")
    if type(name) is not str or not 0 < len(name) <= 128 or "\x00" in name:
        return None
    reported = data.get("mandelboxes", [])
    if type(reported) is not list or len(reported) > MAX_REPORTED_MANDELBOXES:
        return None
    mandelboxes: list[tuple[uuid.UUID, MandelboxStatus]] = []
    for item in reported:
        if type(item) is not dict:
            return None
        mandelbox_id, status = item.get("mandelbox_id"), item.get("status")
        if type(mandelbox_id) is not str or type(status) is not str or status not in _MANDELBOX_STATUSES:
            return None
        if _CANONICAL_UUID.fullmatch(mandelbox_id) is None:
            return None
        mandelboxes.append((uuid.UUID(mandelbox_id), _MANDELBOX_STATUSES[status]))
    metrics = data.get("metrics", {})
    if type(metrics) is not dict or len(metrics) > MAX_METRICS_KEYS or has_nul(metrics):
        return None
    if len(json.dumps(metrics, separators=(",", ":"))) > MAX_METRICS_BYTES:
        return None
    return HeartbeatReport(name, mandelboxes, metrics)


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
