"""The fleet's capacity per (region, client version), as operators and the scaler see it."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fractal.models import Image, Instance, InstanceStatus


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


def list_capacity(session: Session, *, default_target_free: int) -> list[CapacityRow]:
    """One row per (region, client_commit_hash) that has an image or a live host, sorted. Two statements."""
    rows: dict[tuple[str, str], CapacityRow] = {}

    def row(region: str, commit: str) -> CapacityRow:
        key = (region, commit)
        if key not in rows:
            rows[key] = CapacityRow(region=region, client_commit_hash=commit)
        return rows[key]

    for region, commit, active, target in session.execute(
        select(Image.region, Image.client_commit_hash, Image.active, Image.target_free)
    ):
        item = row(region, commit)
        item.active = bool(active)
        item.target_free = (default_target_free if target is None else target) if active else 0

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
