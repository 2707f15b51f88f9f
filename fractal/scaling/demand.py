"""What the scaler measures from the audit log: who is waiting after a 503 right now (every pass, one read of the
last seconds), and for demand-aware buffers who asked lately and how long a launch takes to become ACTIVE (two
bounded reads, only when an image's buffer policy needs them)."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import and_, func, select, union_all
from sqlalchemy.orm import Session

from fractal.clock import seconds_between
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
    in_window = and_(events.c.created_at > cutoff, events.c.created_at <= now)
    # Counted in the database, one row per key: a busy window holds thousands of users (and a retrying user's
    # refusal over and over), which fetched into Python cost more than the rest of the pass. A refusal's key is in
    # its detail (the first region asked for, the version), an assignment's is its instance's.
    refused = select(
        events.c.actor.label("actor"),
        events.c.detail[("regions", 0)].as_string().label("region"),
        events.c.detail["client_commit_hash"].as_string().label("commit"),
    ).where(in_window, events.c.kind == str(EventKind.ASSIGNMENT_REFUSED))
    assigned = (
        select(
            events.c.actor.label("actor"),
            instances.c.region.label("region"),
            instances.c.client_commit_hash.label("commit"),
        )
        .select_from(events)
        .join(instances, instances.c.instance_name == events.c.instance_name)
        .where(in_window, events.c.kind == str(EventKind.MANDELBOX_ASSIGNED))
    )
    asked = union_all(refused, assigned).subquery()
    rows = session.execute(
        select(asked.c.region, asked.c.commit, func.count(asked.c.actor.distinct()))
        .where(asked.c.region.in_(sorted({region for region, _ in wanted})))
        .group_by(asked.c.region, asked.c.commit)
    )
    counts = {(region, commit): int(count) for region, commit, count in rows}
    return {key: counts.get(key, 0) for key in wanted}


def launch_lead_times(session: Session, *, now: datetime, regions: Iterable[str]) -> dict[str, float]:
    """Median seconds from launch (the row's creation) to ACTIVE (its activation event) per region, over the
    newest LEAD_TIME_SAMPLES activations of the last LEAD_TIME_WINDOW_S; regions without one are absent."""
    wanted = sorted(set(regions))
    if not wanted:
        return {}
    cutoff = now - timedelta(seconds=LEAD_TIME_WINDOW_S)
    # The database keeps the newest samples of each region, sorts them by lead time and returns the middle one or
    # two: two rows a region, however many hosts the window saw, rather than every activation of six hours.
    # Python computes the median from those rows' times (exact: SQL's durations are only as fine as its clock
    # arithmetic, enough to sort by).
    lead = seconds_between(events.c.created_at, instances.c.created_at)
    newest = (
        select(
            instances.c.region.label("region"),
            instances.c.created_at.label("launched_at"),
            events.c.created_at.label("activated_at"),
            lead.label("lead_s"),
            func.row_number()
            .over(partition_by=instances.c.region, order_by=(events.c.created_at.desc(), events.c.id.desc()))
            .label("recency"),
        )
        .select_from(events)
        .join(instances, instances.c.instance_name == events.c.instance_name)
        .where(
            events.c.kind == str(EventKind.INSTANCE_ACTIVATED),
            events.c.created_at > cutoff,
            events.c.created_at <= now,
            instances.c.region.in_(wanted),
        )
        .subquery()
    )
    ranked = (
        select(
            newest.c.region,
            newest.c.launched_at,
            newest.c.activated_at,
            func.row_number().over(partition_by=newest.c.region, order_by=newest.c.lead_s).label("position"),
            func.count().over(partition_by=newest.c.region).label("samples"),
        )
        .where(newest.c.recency <= LEAD_TIME_SAMPLES)
        .subquery()
    )
    rows = session.execute(
        select(ranked.c.region, ranked.c.launched_at, ranked.c.activated_at).where(
            # The middle position (odd count) or the two middle ones (even): (n + 1) // 2 and (n + 2) // 2.
            ranked.c.position.in_([(ranked.c.samples + 1) // 2, (ranked.c.samples + 2) // 2])
        )
    )
    middle: dict[str, list[float]] = defaultdict(list)
    for region, launched_at, activated_at in rows:
        middle[region].append(max(0.0, (activated_at - launched_at).total_seconds()))
    return {region: statistics.median(values) for region, values in middle.items()}


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
