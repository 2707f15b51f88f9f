"""What the scaler measures from the audit log: who is waiting after a 503 right now (every pass, one read of the
last seconds), and for demand-aware buffers who asked lately and how long a launch takes to become ACTIVE (two
bounded reads, only when an image's buffer policy needs them)."""

from __future__ import annotations

import functools
import heapq
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, bindparam, func, select, union_all
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
    rows = session.execute(
        _recent_arrivals_statement(),
        {"cutoff": now - timedelta(seconds=window_s), "now": now, "regions": sorted({region for region, _ in wanted})},
    )
    counts = {(region, commit): int(count) for region, commit, count in rows}
    return {key: counts.get(key, 0) for key in wanted}


@functools.cache
def _recent_arrivals_statement() -> Select[Any]:
    """recent_arrivals' read, built once (building it cost more than running it, every pass): binds ``cutoff``,
    ``now`` and the expanding ``regions``."""
    created_at = events.c.created_at
    in_window = and_(
        created_at > bindparam("cutoff", type_=created_at.type), created_at <= bindparam("now", type_=created_at.type)
    )
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
    return (
        select(asked.c.region, asked.c.commit, func.count(asked.c.actor.distinct()))
        .where(asked.c.region.in_(bindparam("regions", expanding=True)))
        .group_by(asked.c.region, asked.c.commit)
    )


def launch_lead_times(
    session: Session, *, now: datetime, regions: Iterable[str], cache: LeadTimeCache | None = None
) -> dict[str, float]:
    """Median seconds from launch (the row's creation) to ACTIVE (its activation event) per region, over the
    newest LEAD_TIME_SAMPLES activations of the last LEAD_TIME_WINDOW_S; regions without one are absent.

    ``cache``: the activations read by earlier passes (``LeadTimeCache``: the scaler loop and the simulator keep
    one); each pass then reads only what changed. None: a throwaway one, every activation of the window is read.
    """
    wanted = sorted(set(regions))
    if not wanted:
        return {}
    return (cache or LeadTimeCache()).lead_times(session, now=now, regions=wanted)


class LeadTimeCache:
    """The window's activations (event id → region, activated at, launched at), kept from pass to pass.

    The median changes only when a host activates or an old activation leaves the window, so a pass reads the
    activations newer than the newest it holds, drops those the window left behind (by their own times), and
    counts the window's activations in the database: the same count proves it holds exactly the window's set
    (what it holds is in the window, so a late commit of an older id shows as a count it lacks, and it reads the
    window again). Valid while nothing deletes activations inside the window: ``clear()`` after a purge (the
    scaler pass does, and skips the cache when a retention setting is shorter than the window). One per process
    and database, used by one thread at a time.
    """

    def __init__(self) -> None:
        self.reads = 0  # full reads of the window (tests and benchmarks look)
        self.clear()

    def clear(self) -> None:
        self._samples: dict[int, tuple[str | None, datetime, datetime | None]] = {}
        self._leaving: list[tuple[datetime, int]] = []  # heap of (activated at, event id): the next to leave
        self._newest_id = 0
        self._as_of: datetime | None = None
        self._medians: dict[str, float] = {}
        self._changed: set[str] | None = None  # regions to recompute (None: all)

    def lead_times(self, session: Session, *, now: datetime, regions: Sequence[str]) -> dict[str, float]:
        cutoff = now - timedelta(seconds=LEAD_TIME_WINDOW_S)
        in_window = and_(
            events.c.kind == str(EventKind.INSTANCE_ACTIVATED), events.c.created_at > cutoff, events.c.created_at <= now
        )
        if self._as_of is None or now < self._as_of:
            self._read_window(session, in_window)
        else:
            changed = self._changed if self._changed is not None else set()
            while self._leaving and self._leaving[0][0] <= cutoff:
                _, event_id = heapq.heappop(self._leaving)
                region = self._samples.pop(event_id)[0]
                if region is not None:
                    changed.add(region)
            self._changed = changed
            self._add(session.execute(_activations(and_(in_window, events.c.id > self._newest_id))))
            held = session.execute(select(func.count()).select_from(events).where(in_window)).scalar_one()
            if held != len(self._samples):
                self._read_window(session, in_window)
        self._as_of = now
        self._recompute()
        return {region: self._medians[region] for region in regions if region in self._medians}

    def _read_window(self, session: Session, in_window: ColumnElement[bool]) -> None:
        self.clear()
        self.reads += 1
        self._add(session.execute(_activations(in_window)))

    def _add(self, rows: Iterable[Any]) -> None:
        for event_id, activated_at, region, launched_at in rows:
            if event_id in self._samples:
                continue
            self._samples[event_id] = (region, activated_at, launched_at)
            heapq.heappush(self._leaving, (activated_at, event_id))
            self._newest_id = max(self._newest_id, event_id)
            if region is not None and self._changed is not None:
                self._changed.add(region)

    def _recompute(self) -> None:
        if self._changed is not None and not self._changed:
            return
        by_region: dict[str, list[tuple[datetime, int, datetime]]] = defaultdict(list)
        for event_id, (region, activated_at, launched_at) in self._samples.items():
            if region is not None and launched_at is not None and (self._changed is None or region in self._changed):
                by_region[region].append((activated_at, event_id, launched_at))
        for region in self._changed if self._changed is not None else list(self._medians):
            self._medians.pop(region, None)
        for region, samples in by_region.items():
            newest = heapq.nlargest(LEAD_TIME_SAMPLES, samples)  # by activation time, then id: the newest
            leads = [max(0.0, (activated_at - launched_at).total_seconds()) for activated_at, _, launched_at in newest]
            self._medians[region] = statistics.median(leads)
        self._changed = set()


def _activations(where: ColumnElement[bool]) -> Any:
    """Activation events (id, time) with their instance's region and launch time (None when the row is gone)."""
    return (
        select(events.c.id, events.c.created_at, instances.c.region, instances.c.created_at)
        .select_from(events)
        .outerjoin(instances, instances.c.instance_name == events.c.instance_name)
        .where(where)
    )


# waiting_users' read, built once (it runs every pass): the window's assignments and refusals, in order.
_WAITING_READ = (
    select(events.c.kind, events.c.actor, events.c.created_at, events.c.detail)
    .where(
        events.c.created_at > bindparam("cutoff", type_=events.c.created_at.type),
        events.c.created_at <= bindparam("now", type_=events.c.created_at.type),
        events.c.kind.in_([str(EventKind.MANDELBOX_ASSIGNED), str(EventKind.ASSIGNMENT_REFUSED)]),
    )
    .order_by(events.c.id)
)


def waiting_users(session: Session, *, now: datetime, window_s: float) -> dict[tuple[str, str], int]:
    """Users per (region, client_commit_hash) refused for lack of room in the last ``window_s`` seconds and not
    given a mandelbox since: they are retrying now (every Retry-After), and the buffer must cover them too."""
    cutoff = now - timedelta(seconds=window_s)
    last_refused: dict[str, tuple[datetime, tuple[str, str]]] = {}
    assigned: dict[str, datetime] = {}
    rows = session.execute(_WAITING_READ, {"cutoff": cutoff, "now": now})
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
