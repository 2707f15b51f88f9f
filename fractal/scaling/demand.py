"""What the scaler measures from the audit log: who is waiting after a 503 right now (every pass, one read of the
last seconds), and for demand-aware buffers who asked lately and how long a launch takes to become ACTIVE (two
bounded reads, only when an image's buffer policy needs them)."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import case, select
from sqlalchemy.orm import Session

from fractal.errors import ErrorCode
from fractal.events import EventKind
from fractal.models import Event, Instance

# The reads below name the tables' columns, not the mapped classes': rows come back as plain Core rows, without the
# ORM's per-row loading (the same SQL and values; the demand reads fetch thousands of rows a pass at a busy hour).
events = Event.__table__
instances = Instance.__table__

# Launch lead times are the median over the region's launches that became ACTIVE within this long.
LEAD_TIME_WINDOW_S = 6 * 3600.0
LEAD_TIME_SAMPLES = 50
# A user refused within this long and not served since is still retrying (clients retry after Retry-After, 10 s).
WAITING_WINDOW_S = 30.0


def recent_arrivals(
    session: Session, *, now: datetime, window_s: float, keys: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """Distinct users per (region, client_commit_hash) who were given a mandelbox or refused one (their first
    region) since ``now - window_s``: the demand, served or not, each user once however often they retried."""
    wanted = set(keys)
    if not wanted:
        return {}
    cutoff = now - timedelta(seconds=window_s)
    users: dict[tuple[str, str], set[str]] = defaultdict(set)
    # DISTINCT: a user retrying every 10 s writes the same refusal over and over; one row of it is enough. Only a
    # refusal's detail is read (an assignment's key is its instance's): the others' is not fetched nor parsed.
    refusal = str(EventKind.ASSIGNMENT_REFUSED)
    detail = case((events.c.kind == refusal, events.c.detail), else_=None)
    rows = session.execute(
        select(events.c.kind, events.c.actor, detail, instances.c.region, instances.c.client_commit_hash)
        .select_from(events)
        .outerjoin(instances, instances.c.instance_name == events.c.instance_name)
        .where(
            events.c.created_at > cutoff,
            events.c.created_at <= now,
            events.c.kind.in_([str(EventKind.MANDELBOX_ASSIGNED), str(EventKind.ASSIGNMENT_REFUSED)]),
        )
        .distinct()
    )
    for kind, actor, detail, region, commit in rows:
        if kind == EventKind.ASSIGNMENT_REFUSED:
            asked = (detail or {}).get("regions") or []
            if not asked:
                continue
            key = (str(asked[0]), str((detail or {}).get("client_commit_hash")))
        else:
            key = (region, commit)
        if key in wanted:
            users[key].add(actor)
    return {key: len(users.get(key, ())) for key in wanted}


def launch_lead_times(session: Session, *, now: datetime, regions: Iterable[str]) -> dict[str, float]:
    """Median seconds from launch (the row's creation) to ACTIVE (its activation event) per region, over the
    newest activations of the last LEAD_TIME_WINDOW_S; regions without one are absent."""
    wanted = sorted(set(regions))
    if not wanted:
        return {}
    cutoff = now - timedelta(seconds=LEAD_TIME_WINDOW_S)
    samples: dict[str, list[float]] = defaultdict(list)
    rows = session.execute(
        select(instances.c.region, instances.c.created_at, events.c.created_at)
        .select_from(events)
        .join(instances, instances.c.instance_name == events.c.instance_name)
        .where(
            events.c.kind == str(EventKind.INSTANCE_ACTIVATED),
            events.c.created_at > cutoff,
            events.c.created_at <= now,
            instances.c.region.in_(wanted),
        )
        .order_by(events.c.created_at.desc())
    )
    for region, launched_at, activated_at in rows:
        if len(samples[region]) < LEAD_TIME_SAMPLES:
            samples[region].append(max(0.0, (activated_at - launched_at).total_seconds()))
    return {region: statistics.median(values) for region, values in samples.items() if values}


def waiting_users(session: Session, *, now: datetime, window_s: float) -> dict[tuple[str, str], int]:
    """Users per (region, client_commit_hash) refused for lack of room in the last ``window_s`` seconds and not
    given a mandelbox since: they are retrying now (every Retry-After), and the buffer must cover them too."""
    cutoff = now - timedelta(seconds=window_s)
    last_refused: dict[str, tuple[datetime, tuple[str, str]]] = {}
    assigned: dict[str, datetime] = {}
    rows = session.execute(
        select(events.c.kind, events.c.actor, events.c.created_at, events.c.detail)
        .where(
            events.c.created_at > cutoff,
            events.c.created_at <= now,
            events.c.kind.in_([str(EventKind.MANDELBOX_ASSIGNED), str(EventKind.ASSIGNMENT_REFUSED)]),
        )
        .order_by(events.c.id)
    )
    for kind, actor, created_at, detail in rows:
        detail = detail or {}
        if kind == EventKind.MANDELBOX_ASSIGNED:
            assigned[actor] = created_at
        elif detail.get("code") == str(ErrorCode.NO_INSTANCE_AVAILABLE) and detail.get("regions"):
            last_refused[actor] = (created_at, (str(detail["regions"][0]), str(detail.get("client_commit_hash"))))
    counts: Counter[tuple[str, str]] = Counter()
    for actor, (refused_at, key) in last_refused.items():
        if actor not in assigned or assigned[actor] < refused_at:
            counts[key] += 1
    return dict(counts)
