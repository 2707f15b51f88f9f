"""The fleet's capacity per (region, client version), as operators and the scaler see it."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fractal.clock import database_now
from fractal.models import Instance, InstanceStatus
from fractal.scaling.policy import TargetDecision, decide_target
from fractal.scaling.steps import observe


@dataclass
class CapacityRow:
    """``capacity``/``used``/``free`` count ACTIVE hosts plus booting (PRE_CONNECTION) ones, which is the buffer
    the scaler keeps at ``target_free``; ``instances`` counts every non-TERMINATED host by status."""

    region: str
    client_commit_hash: str
    active: bool = False
    instances: dict[str, int] = field(default_factory=dict)
    capacity: int = 0
    used: int = 0
    free: int = 0
    target_free: int = 0
    live_mandelboxes: int = 0
    # Why the scaler chose target_free (static, demand, floor, ceiling, schedule, inactive) and from what.
    target_reason: str = "inactive"
    target_detail: dict[str, Any] = field(default_factory=dict)


def image_targets(
    session: Session, *, default_target_free: int, now: datetime | None = None
) -> dict[tuple[str, str], TargetDecision]:
    """The free-slot target the scaler's next pass would give each active image, and why: the same reads
    (``steps.observe``) and the same decision (``policy.decide_target``) as the pass."""
    now = now or database_now(session)
    return {
        (image.region, image.client_commit_hash): decide_target(image, default_target_free, now=now)
        for image in observe(session, now=now).images
        if image.active
    }


def list_capacity(session: Session, *, default_target_free: int) -> list[CapacityRow]:
    """One row per (region, client_commit_hash) that has an image or a live host, sorted. Two statements (four
    when an image has a demand-aware buffer policy)."""
    rows: dict[tuple[str, str], CapacityRow] = {}

    def row(region: str, commit: str) -> CapacityRow:
        key = (region, commit)
        if key not in rows:
            rows[key] = CapacityRow(region=region, client_commit_hash=commit)
        return rows[key]

    now = database_now(session)
    for image in observe(session, now=now).images:
        item = row(image.region, image.client_commit_hash)
        item.active = image.active
        if image.active:
            decision = decide_target(image, default_target_free, now=now)
            item.target_free, item.target_reason, item.target_detail = decision.target, decision.reason, decision.detail

    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for region, commit, status, n, capacity, live in session.execute(
        select(
            Instance.region,
            Instance.client_commit_hash,
            Instance.status,
            func.count(),
            func.coalesce(func.sum(Instance.mandelbox_capacity), 0),
            func.coalesce(func.sum(Instance.live_mandelboxes), 0),
        )
        .where(Instance.status != InstanceStatus.TERMINATED)
        .group_by(Instance.region, Instance.client_commit_hash, Instance.status)
    ):
        item = row(region, commit)
        counts[(region, commit)][str(status)] = int(n)
        item.live_mandelboxes += int(live)
        if status in (InstanceStatus.ACTIVE, InstanceStatus.PRE_CONNECTION):
            item.capacity += int(capacity)
            item.used += int(live)
    for key, item in rows.items():
        item.instances = {
            str(s): counts[key].get(str(s), 0) for s in InstanceStatus if s is not InstanceStatus.TERMINATED
        }
        item.free = item.capacity - item.used
    return [rows[key] for key in sorted(rows)]
