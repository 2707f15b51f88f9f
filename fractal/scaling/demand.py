"""What the scaler measures from the audit log: who is waiting after a 503 right now (every pass, from the last
seconds' asks), and for demand-aware buffers who asked lately and how long a launch takes to become ACTIVE (only when
an image's buffer policy needs them). Each is a bounded read; a ``DemandCache`` kept from pass to pass makes each
read only what changed since the last pass."""

from __future__ import annotations

import bisect
import functools
import heapq
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, bindparam, func, select, union_all
from sqlalchemy.orm import Session

from fractal.database import DriverStatement, sqlite_unindexed
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
# The longest arrival window a buffer policy may ask for (the admin API's bound).
ARRIVAL_WINDOW_MAX_S = 86_400.0
# A user refused within this long and not served since is still retrying (clients retry after Retry-After, 10 s).
WAITING_WINDOW_S = 30.0


def recent_arrivals(
    session: Session,
    *,
    now: datetime,
    window_s: float,
    keys: Iterable[tuple[str, str]],
    cache: AskCache | None = None,
) -> dict[tuple[str, str], int]:
    """Distinct users per (region, client_commit_hash) who were given a mandelbox or refused one (their first
    region) since ``now - window_s``: the demand, served or not, each user once however often they retried.

    ``cache``: the asks earlier passes read (``AskCache``); None: counted in the database."""
    wanted = set(keys)
    if not wanted:
        return {}
    if cache is not None and cache.refresh(session, now=now, window_s=window_s):
        return cache.arrivals(wanted, since=now - timedelta(seconds=window_s))
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
        # The samples a median is taken over (a region and a launch time known), by region: a recompute walks the
        # changed regions' own, not every activation of the window.
        self._by_region: defaultdict[str, dict[int, tuple[datetime, datetime]]] = defaultdict(dict)

    def lead_times(self, session: Session, *, now: datetime, regions: Sequence[str]) -> dict[str, float]:
        bounds = {"cutoff": now - timedelta(seconds=LEAD_TIME_WINDOW_S), "now": now}
        if self._as_of is None or now < self._as_of:
            self._read_window(session, bounds)
        else:
            changed = self._changed if self._changed is not None else set()
            while self._leaving and self._leaving[0][0] <= bounds["cutoff"]:
                _, event_id = heapq.heappop(self._leaving)
                region = self._samples.pop(event_id)[0]
                if region is not None:
                    changed.add(region)
                    self._by_region[region].pop(event_id, None)
            self._changed = changed
            self._add(_ACTIVATIONS_AFTER.execute(session, {**bounds, "after": self._newest_id}))
            held = _ACTIVATIONS_COUNT.execute(session, bounds).scalar_one()
            if held != len(self._samples):
                self._read_window(session, bounds)
        self._as_of = now
        self._recompute()
        return {region: self._medians[region] for region in regions if region in self._medians}

    def _read_window(self, session: Session, bounds: dict[str, datetime]) -> None:
        self.clear()
        self.reads += 1
        self._add(_ACTIVATIONS.execute(session, bounds))

    def _add(self, rows: Iterable[Any]) -> None:
        for event_id, activated_at, region, launched_at in rows:
            if event_id in self._samples:
                continue
            self._samples[event_id] = (region, activated_at, launched_at)
            heapq.heappush(self._leaving, (activated_at, event_id))
            self._newest_id = max(self._newest_id, event_id)
            if region is not None and launched_at is not None:
                self._by_region[region][event_id] = (activated_at, launched_at)
            if region is not None and self._changed is not None:
                self._changed.add(region)

    def _recompute(self) -> None:
        if self._changed is not None and not self._changed:
            return
        for region in self._changed if self._changed is not None else list(self._medians):
            self._medians.pop(region, None)
        for region in sorted(self._changed if self._changed is not None else self._by_region):
            held = self._by_region.get(region)
            if not held:
                continue
            samples = [(activated_at, event_id, launched_at) for event_id, (activated_at, launched_at) in held.items()]
            newest = heapq.nlargest(LEAD_TIME_SAMPLES, samples)  # by activation time, then id: the newest
            leads = [max(0.0, (activated_at - launched_at).total_seconds()) for activated_at, _, launched_at in newest]
            self._medians[region] = statistics.median(leads)
        self._changed = set()


class DemandCache:
    """What the demand reads keep from pass to pass (the scaler loop and the simulator keep one per process and
    database): the launch lead times' activations and the recent asks."""

    def __init__(self) -> None:
        self.lead_times = LeadTimeCache()
        self.asks = AskCache()

    def clear(self) -> None:
        """Forget everything (after a purge, which may delete what they hold)."""
        self.lead_times.clear()
        self.asks.clear()


def _activations_read(*, after_id: bool) -> Select[Any]:
    """Activation events (id, time) of the window with their instance's region and launch time (None when the row
    is gone); binds ``cutoff``, ``now`` and, with ``after_id``, ``after`` (ids above it only: the window's terms
    then unindexed on SQLite, see ``_by_id``)."""
    return (
        select(events.c.id, events.c.created_at, instances.c.region, instances.c.created_at)
        .select_from(events)
        .outerjoin(instances, instances.c.instance_name == events.c.instance_name)
        .where(
            _in_activation_window(by_id=after_id),
            *([events.c.id > bindparam("after", type_=events.c.id.type)] if after_id else []),
        )
    )


def _in_activation_window(*, by_id: bool = False) -> ColumnElement[bool]:
    kind, created_at = (
        (_by_id(events.c.kind), _by_id(events.c.created_at)) if by_id else (events.c.kind, events.c.created_at)
    )
    return and_(
        kind == str(EventKind.INSTANCE_ACTIVATED),
        created_at > bindparam("cutoff", type_=events.c.created_at.type),
        created_at <= bindparam("now", type_=events.c.created_at.type),
    )


def _by_id(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """``column`` in the reads past an id: unindexed on SQLite (``sqlite_unindexed``).

    The caches' reads of the asks and activations newer than the newest held (every pass) are few rows past an id,
    which SQLite (no statistics) would otherwise find by walking the whole window's rows on ``(kind, created_at)``
    and sorting them: written this way, it walks the id range from ``after`` (a few hundred events a pass) instead.
    Postgres plans these by its statistics and gets the plain column."""
    return sqlite_unindexed(column)


# The lead times' reads, built once (every pass runs two: building them cost more than running them).
_ACTIVATIONS = DriverStatement(_activations_read(after_id=False))
_ACTIVATIONS_AFTER = DriverStatement(_activations_read(after_id=True))
_ACTIVATIONS_COUNT = DriverStatement(select(func.count()).select_from(events).where(_in_activation_window()))


# waiting_users' read, built once (it runs every pass when no AskCache is kept): the window's assignments and
# refusals, in order, as the AskCache reads them.
def _asks_read(*, after_id: bool) -> Select[Any]:
    """The window's asks (assignments and refusals) in id order, with an assignment's instance's region and version
    (None when the row is gone); binds ``cutoff``, ``now`` and, with ``after_id``, ``after`` (ids above it only: the
    window's terms then unindexed on SQLite, see ``_by_id``)."""
    created_at = events.c.created_at
    when, kind = (_by_id(created_at), _by_id(events.c.kind)) if after_id else (created_at, events.c.kind)
    where = [
        when > bindparam("cutoff", type_=created_at.type),
        when <= bindparam("now", type_=created_at.type),
        kind.in_(ASK_KINDS),
    ]
    if after_id:
        where.append(events.c.id > bindparam("after", type_=events.c.id.type))
    return (
        select(
            events.c.id,
            events.c.kind,
            events.c.actor,
            created_at,
            events.c.detail,
            instances.c.region,
            instances.c.client_commit_hash,
        )
        .select_from(events)
        .outerjoin(instances, instances.c.instance_name == events.c.instance_name)
        .where(*where)
        .order_by(events.c.id)
    )


ASK_KINDS = (str(EventKind.MANDELBOX_ASSIGNED), str(EventKind.ASSIGNMENT_REFUSED))
_ASKS_READ = DriverStatement(_asks_read(after_id=False))
_ASKS_AFTER_READ = DriverStatement(_asks_read(after_id=True))
_ASKS_COUNT = DriverStatement(
    select(func.count())
    .select_from(events)
    .where(
        events.c.created_at > bindparam("cutoff", type_=events.c.created_at.type),
        events.c.created_at <= bindparam("now", type_=events.c.created_at.type),
        events.c.kind.in_(ASK_KINDS),
    )
)


@dataclass(frozen=True, slots=True)
class Ask:
    """One assignment or refusal event, as the demand reads see it."""

    event_id: int
    assigned: bool
    actor: str
    created_at: datetime
    # recent_arrivals' key: a refusal's first region asked and version (from its detail), an assignment's
    # instance's (None when the instance row is gone, or a refusal names no region).
    key: tuple[str, str | None] | None
    # waiting_users' key: set only on a refusal for lack of room (NO_INSTANCE_AVAILABLE) that names a region.
    waiting_key: tuple[str, str] | None

    @classmethod
    def from_row(cls, row: Any) -> Ask:
        event_id, kind, actor, created_at, detail, region, commit = row
        if kind == EventKind.MANDELBOX_ASSIGNED:
            key = (region, commit) if region is not None else None
            return cls(event_id, True, actor, created_at, key, None)
        detail = detail or {}
        regions = detail.get("regions") or []
        first = _as_text(regions[0]) if regions else None
        commit = _as_text(detail.get("client_commit_hash"))
        waiting = detail.get("code") == str(ErrorCode.NO_INSTANCE_AVAILABLE) and bool(regions)
        return cls(
            event_id,
            False,
            actor,
            created_at,
            (first, commit) if first is not None else None,
            (str(regions[0]), str(detail.get("client_commit_hash"))) if waiting else None,
        )


def _as_text(value: Any) -> str | None:
    """A JSON value as the database's ``->>`` gives it (None stays None)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def waiting_users(
    session: Session, *, now: datetime, window_s: float, cache: AskCache | None = None
) -> dict[tuple[str, str], int]:
    """Users per (region, client_commit_hash) refused for lack of room in the last ``window_s`` seconds and not
    given a mandelbox since: they are retrying now (every Retry-After), and the buffer must cover them too.

    ``cache``: the asks earlier passes read (``AskCache``); None: the window is read anew."""
    if cache is not None and cache.refresh(session, now=now, window_s=window_s):
        return count_waiting(cache.asks_since(now - timedelta(seconds=window_s)))
    rows = _ASKS_READ.execute(session, {"cutoff": now - timedelta(seconds=window_s), "now": now})
    return count_waiting(Ask.from_row(row) for row in rows)


def count_waiting(asks: Iterable[Ask]) -> dict[tuple[str, str], int]:
    """waiting_users' count over the window's asks in id order: each user's last refusal for lack of room, unless
    an assignment came after it."""
    last_refused: dict[str, tuple[datetime, tuple[str, str]]] = {}
    assigned: dict[str, datetime] = {}
    for ask in asks:
        if ask.assigned:
            assigned[ask.actor] = ask.created_at
        elif ask.waiting_key is not None:
            last_refused[ask.actor] = (ask.created_at, ask.waiting_key)
    counts: Counter[tuple[str, str]] = Counter()
    for actor, (refused_at, key) in last_refused.items():
        if actor not in assigned or assigned[actor] < refused_at:
            counts[key] += 1
    return dict(counts)


class AskCache:
    """The asks (assignments and refusals) of the longest window asked for, kept from pass to pass: each pass reads
    only the asks newer than the newest it holds, and answers ``recent_arrivals`` and ``waiting_users`` from memory
    (a busy window holds thousands, which the database would count again every pass).

    As ``LeadTimeCache`` does, it drops what left the window by the asks' own times and checks its size against
    the database's count of the window: what it holds is in the window, so the same count proves it holds the
    window's whole set. A lower id committed late (Postgres hands ids out before commit) shows as a count it
    lacks: it reads again the newest ``TAIL_IDS`` ids it holds and above, which finds such an ask, and only when
    the count is still off the whole window. Valid while nothing deletes asks inside the window: ``clear()``
    after a purge (the scaler pass does). One per process and database, used by one thread at a time.
    """

    TAIL_IDS = 2_000
    # At most this many asks are held (tens of MB): a longer or busier window (users refused every Retry-After for
    # hours) is counted in the database each pass instead, as without a cache.
    MAX_HELD = 200_000

    def __init__(self) -> None:
        self.reads = 0  # full reads of the window (tests and benchmarks look)
        self._window_s = 0.0  # the longest window asked for (kept by ``clear``)
        self.clear()

    def clear(self) -> None:
        """Forget every ask held; the next refresh reads the window whole."""
        self._asks: dict[int, Ask] = {}
        self._order: list[tuple[datetime, int]] = []  # (created_at, event id), sorted: leaving from the front
        self._actors: dict[tuple[str, str | None], Counter[str]] = defaultdict(Counter)  # distinct users per key
        self._newest_id = 0  # the highest id read (late commits below it are found by the count)
        self._as_of: datetime | None = None

    def refresh(self, session: Session, *, now: datetime, window_s: float) -> bool:
        """Hold the asks of (``now`` - the longest window asked for so far, ``now``]. False when the window holds more
        than ``MAX_HELD`` (nothing is held then: the caller counts in the database, as without a cache)."""
        if self._as_of is not None and now == self._as_of and window_s <= self._window_s:
            return True  # this pass's other read: nothing to do
        if self._as_of is None or now < self._as_of or window_s > self._window_s:
            self._window_s = max(window_s, self._window_s)
            return self._read_window(session, now)
        cutoff = now - timedelta(seconds=self._window_s)
        leaving = bisect.bisect_right(self._order, (cutoff, _MAX_ID))
        for _, event_id in self._order[:leaving]:
            self._forget(self._asks.pop(event_id))
        del self._order[:leaving]
        bounds = {"cutoff": cutoff, "now": now}
        self._add(_ASKS_AFTER_READ.execute(session, {**bounds, "after": self._newest_id}))
        held = self._window_count(session, bounds)
        if held != len(self._asks):
            ids = sorted(self._asks)
            tail_floor = ids[-self.TAIL_IDS] if len(ids) >= self.TAIL_IDS else 0
            self._add(_ASKS_AFTER_READ.execute(session, {**bounds, "after": tail_floor - 1}))
            if held != len(self._asks):
                return self._read_window(session, now)
        if held > self.MAX_HELD:
            return self._give_up()
        self._as_of = now
        return True

    def arrivals(self, keys: Iterable[tuple[str, str]], *, since: datetime) -> dict[tuple[str, str], int]:
        """Distinct users per key among the asks after ``since`` (held: ``refresh`` covered it)."""
        if self._as_of is not None and since == self._as_of - timedelta(seconds=self._window_s):
            return {key: len(self._actors.get(key, ())) for key in keys}
        actors: dict[tuple[str, str | None], set[str]] = defaultdict(set)
        for ask in self.asks_since(since):
            if ask.key is not None:
                actors[ask.key].add(ask.actor)
        return {key: len(actors.get(key, ())) for key in keys}

    def asks_since(self, since: datetime) -> list[Ask]:
        """The held asks after ``since``, in id order."""
        start = bisect.bisect_right(self._order, (since, _MAX_ID))
        return sorted((self._asks[event_id] for _, event_id in self._order[start:]), key=lambda ask: ask.event_id)

    def _read_window(self, session: Session, now: datetime) -> bool:
        self.clear()
        bounds = {"cutoff": now - timedelta(seconds=self._window_s), "now": now}
        if self._window_count(session, bounds) > self.MAX_HELD:
            return self._give_up()
        self.reads += 1
        self._add(_ASKS_READ.execute(session, bounds))
        self._as_of = now
        return True

    def _give_up(self) -> bool:
        """Too many asks to hold: forget them (the next pass tries again, from a count)."""
        self.clear()
        return False

    def _window_count(self, session: Session, bounds: dict[str, datetime]) -> int:
        return int(_ASKS_COUNT.execute(session, bounds).scalar_one())

    def _add(self, rows: Iterable[Any]) -> None:
        for row in rows:
            ask = Ask.from_row(row)
            if ask.event_id in self._asks:
                continue
            self._asks[ask.event_id] = ask
            self._newest_id = max(self._newest_id, ask.event_id)
            bisect.insort(self._order, (ask.created_at, ask.event_id))
            if ask.key is not None:
                self._actors[ask.key][ask.actor] += 1

    def _forget(self, ask: Ask) -> None:
        if ask.key is None:
            return
        actors = self._actors[ask.key]
        actors[ask.actor] -= 1
        if actors[ask.actor] <= 0:
            del actors[ask.actor]
            if not actors:
                del self._actors[ask.key]


_MAX_ID = 2**63
