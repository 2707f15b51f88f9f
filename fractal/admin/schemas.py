"""Admin API bodies."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, Field, StringConstraints, model_validator

from fractal.auth.api_keys import ApiScope
from fractal.clock import Timestamp
from fractal.config import Settings
from fractal.errors import ValidationError
from fractal.events import EventKind
from fractal.fleet.views import InstanceView
from fractal.models import InstanceStatus, MandelboxStatus
from fractal.regions import region_problem
from fractal.scaling.demand import ARRIVAL_WINDOW_MAX_S
from fractal.schemas import RequestIn, StrictIn

Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]

# Every admin list pages with a cursor (ARCHITECTURE.md section 12); `limit` documents its default and maximum.
CURSOR_DESCRIPTION = "The next_cursor of the previous page; omit it for the first page."
NEXT_CURSOR_DESCRIPTION = "Pass as cursor for the next page; null when no rows are behind this page."


class ScheduledMinimumIn(StrictIn):
    hours_utc: list[Annotated[int, Field(ge=0, le=23)]] = Field(min_length=1, max_length=24)
    min_free: int = Field(ge=0, le=100_000)


class BufferPolicyIn(StrictIn):
    """How the image's free-slot target is chosen. ``static``: ``target_free`` (or the settings default);
    ``demand``: distinct users asking per second over ``window_s`` x the region's measured launch-to-ACTIVE time
    x ``safety_factor``, within [``floor``, ``ceiling``]. ``schedule`` raises either to a minimum in given UTC
    hours."""

    kind: Literal["static", "demand"] = "demand"
    safety_factor: float = Field(default=1.5, gt=0, le=100)
    window_s: float = Field(default=900, ge=60, le=ARRIVAL_WINDOW_MAX_S)
    floor: int = Field(default=0, ge=0, le=100_000)
    ceiling: int = Field(default=100, ge=0, le=100_000)
    default_lead_time_s: float = Field(default=180, ge=0, le=86_400)
    schedule: list[ScheduledMinimumIn] = Field(default_factory=list, max_length=48)

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> BufferPolicyIn:
        if self.floor > self.ceiling:
            raise ValueError("floor must not exceed ceiling")
        return self


class ImageIn(StrictIn):
    ami_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    active: bool
    instance_type: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    mandelbox_capacity: int = Field(ge=1, le=10_000)
    target_free: int | None = Field(default=None, ge=0, le=100_000)
    buffer_policy: BufferPolicyIn | None = None


class ImageOut(BaseModel):
    region: str
    client_commit_hash: str
    ami_id: str
    active: bool
    instance_type: str
    mandelbox_capacity: int
    target_free: int | None
    buffer_policy: dict[str, Any] | None = None
    created_at: Timestamp
    updated_at: Timestamp


class ImageListOut(BaseModel):
    images: list[ImageOut]
    next_cursor: str | None = Field(default=None, description=NEXT_CURSOR_DESCRIPTION)


class InstanceListOut(BaseModel):
    instances: list[InstanceView]
    next_cursor: str | None = Field(default=None, description=NEXT_CURSOR_DESCRIPTION)


class InstanceIn(StrictIn):
    """Register a host by hand; ``ami_id`` and ``instance_type`` default to the image of (region, commit)."""

    instance_name: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
    region: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$")]
    client_commit_hash: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    mandelbox_capacity: int = Field(ge=1, le=10_000)
    ami_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    instance_type: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    cloud_provider_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None


class InstanceCreatedOut(BaseModel):
    instance_name: str
    status: InstanceStatus
    host_secret: str = Field(description="Shown once; only its hash is stored")


class EventOut(BaseModel):
    id: int
    created_at: Timestamp
    kind: str
    actor: str
    instance_name: str | None
    mandelbox_id: uuid.UUID | None
    detail: dict[str, Any]


class EventListOut(BaseModel):
    events: list[EventOut]
    next_cursor: str | None = Field(default=None, description=NEXT_CURSOR_DESCRIPTION)


class PageIn(RequestIn):
    cursor: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = Field(
        default=None, description=CURSOR_DESCRIPTION
    )


class ImageFilterIn(PageIn):
    limit: int = Field(default=500, ge=1, le=5000, description="Rows per page (at most 5000)")


class EventFilterIn(PageIn):
    limit: int = Field(default=100, ge=1, le=1000, description="Rows per page (at most 1000)")
    kind: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = Field(
        default=None, description="Only these kinds, comma-separated (e.g. `mandelbox.assigned,assignment.refused`)."
    )
    since: Annotated[AwareDatetime, Field(strict=False)] | None = Field(
        default=None, description="Only events written at or after this time (RFC 3339 with an offset)."
    )
    until: Annotated[AwareDatetime, Field(strict=False)] | None = Field(
        default=None, description="Only events written before this time (RFC 3339 with an offset)."
    )

    @model_validator(mode="after")
    def _known_kinds(self) -> EventFilterIn:
        if self.kind is not None and not self.kinds:
            raise ValueError("kind names no event kind")
        unknown = sorted(set(self.kinds) - {str(kind) for kind in EventKind})
        if unknown:
            raise ValueError(f"unknown event kind(s): {', '.join(unknown)[:200]}")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since must not be after until")
        return self

    @property
    def kinds(self) -> list[str]:
        return [part.strip() for part in (self.kind or "").split(",") if part.strip()]


class InstanceFilterIn(PageIn):
    region: Annotated[str, StringConstraints(max_length=64)] | None = None
    status: InstanceStatus | None = None
    limit: int = Field(default=500, ge=1, le=5000, description="Rows per page (at most 5000)")


class MandelboxFilterIn(PageIn):
    user_id: Annotated[str, StringConstraints(max_length=255)] | None = None
    status: MandelboxStatus | None = None
    instance_name: Annotated[str, StringConstraints(max_length=128)] | None = None
    limit: int = Field(default=500, ge=1, le=5000, description="Rows per page (at most 5000)")


def validate_image_key(region: str, client_commit_hash: str, settings: Settings) -> None:
    """Path parts of an image: a region name the settings allow and a commit hash of at most 64 characters."""
    problems: dict[str, list[str]] = {}
    if (problem := region_problem(region, settings)) is not None:
        problems["region"] = [problem]
    if not 1 <= len(client_commit_hash) <= 64 or client_commit_hash.strip() != client_commit_hash:
        problems["client_commit_hash"] = ["must be 1-64 characters without surrounding spaces"]
    if problems:
        raise ValidationError("The image key is not valid.", details={"path": problems})


class ApiKeyIn(StrictIn):
    name: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    scopes: list[Annotated[ApiScope, Field(strict=False)]] = Field(
        min_length=1,
        max_length=len(ApiScope),
        description="admin:read (every GET), admin:write (every other admin route; implies images:write), "
        "images:write (PUT /admin/images/... only)",
    )
    # RFC 3339 text with an offset (strict mode would refuse text for a datetime).
    expires_at: Annotated[AwareDatetime, Field(strict=False)] | None = Field(
        default=None, description="Optional; RFC 3339 with an offset, in the future"
    )


class ApiKeyOut(BaseModel):
    id: str = Field(description="The key's public part: the key is fk_<id>_<secret>")
    name: str
    scopes: list[str]
    created_at: Timestamp
    created_by: str
    expires_at: Timestamp | None
    revoked_at: Timestamp | None
    last_used_at: Timestamp | None = Field(description="Refreshed at most once a minute")


class ApiKeyCreatedOut(ApiKeyOut):
    key: str = Field(description="Shown once; only its digest is stored")


class ApiKeyListOut(BaseModel):
    api_keys: list[ApiKeyOut]
    next_cursor: str | None = Field(default=None, description=NEXT_CURSOR_DESCRIPTION)


class ApiKeyFilterIn(PageIn):
    limit: int = Field(default=500, ge=1, le=5000, description="Rows per page (at most 5000)")
