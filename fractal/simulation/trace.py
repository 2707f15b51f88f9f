"""Demand traces: who asks for a mandelbox when, where, with which client, for how long.

Three sources: a CSV (``arrival,region,client_commit_hash,session_s``), an export of a deployment's audit log
(:func:`export_events`), and a synthetic generator (:func:`synthetic_trace`: a daily curve per region, spikes, a
version roll-out). All deterministic: the same input (and seed) gives the same trace.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from fractal.clock import as_utc, format_timestamp
from fractal.events import EventKind
from fractal.models import Event

CSV_FIELDS = ("arrival", "region", "client_commit_hash", "session_s")
# An exported refusal never followed by an assign within this long is a user who gave up.
EXPORT_GIVE_UP_S = 3600.0


@dataclass(frozen=True, order=True)
class SessionRequest:
    """One user's session: arrives at ``arrival`` (UTC), wants ``region`` and ``client_commit_hash``, and keeps the
    mandelbox ``session_s`` seconds once given one."""

    arrival: datetime
    region: str
    client_commit_hash: str
    session_s: float


def read_csv(source: Path | TextIO) -> list[SessionRequest]:
    """Read a trace CSV (header ``arrival,region,client_commit_hash,session_s``; RFC 3339 or ISO arrivals)."""
    if isinstance(source, Path):
        with source.open(newline="") as handle:
            return read_csv(handle)
    rows = []
    for number, row in enumerate(csv.DictReader(source), start=2):
        try:
            arrival = as_utc(datetime.fromisoformat(row["arrival"].replace("Z", "+00:00")))
            rows.append(SessionRequest(arrival, row["region"], row["client_commit_hash"], float(row["session_s"])))
        except (KeyError, ValueError, AttributeError) as error:
            raise ValueError(f"trace line {number}: {error!r} (want columns {', '.join(CSV_FIELDS)})") from error
    return sorted(rows)


def write_csv(trace: Iterable[SessionRequest], target: Path | TextIO) -> None:
    if isinstance(target, Path):
        with target.open("w", newline="") as handle:
            write_csv(trace, handle)
        return
    writer = csv.writer(target)
    writer.writerow(CSV_FIELDS)
    for item in trace:
        writer.writerow([format_timestamp(item.arrival), item.region, item.client_commit_hash, f"{item.session_s:.1f}"])


# --- the audit log ---------------------------------------------------------------------------------------------


# The audit records an export reads: the assigns and refusals (arrivals) and the status moves (a session ends when
# its mandelbox moves to EXITED).
EXPORT_KINDS = (
    str(EventKind.MANDELBOX_ASSIGNED),
    str(EventKind.ASSIGNMENT_REFUSED),
    str(EventKind.MANDELBOX_STATUS),
    str(EventKind.MANDELBOX_RELEASED),
)


class AuditRecord(NamedTuple):
    """The part of one audit event an export needs (a row of the ``events`` table, or of ``GET /admin/events``)."""

    kind: str
    actor: str
    created_at: datetime
    mandelbox_id: object | None
    detail: dict[str, Any]


def export_events(
    session: Session, *, since: datetime | None = None, until: datetime | None = None, default_session_s: float = 1800
) -> list[SessionRequest]:
    """A trace from a deployment's audit log (the ``events`` table): :func:`trace_from_events` over its rows."""
    query = select(Event.kind, Event.actor, Event.created_at, Event.mandelbox_id, Event.detail).where(
        Event.kind.in_(EXPORT_KINDS)
    )
    if since is not None:
        query = query.where(Event.created_at >= since)
    if until is not None:
        query = query.where(Event.created_at < until)
    records = (
        AuditRecord(kind, actor, as_utc(created_at), mandelbox_id, detail or {})
        for kind, actor, created_at, mandelbox_id, detail in session.execute(query.order_by(Event.id))
    )
    return trace_from_events(records, until=until, default_session_s=default_session_s)


def trace_from_events(
    records: Iterable[AuditRecord], *, until: datetime | None = None, default_session_s: float = 1800
) -> list[SessionRequest]:
    """The sessions an audit log records, oldest record first (the same for the database and the admin API).

    Each assigned mandelbox is one session: it arrived at its user's first refusal before the assign (they were
    retrying after 503s) or else at the assign, and lasted until the mandelbox moved to EXITED (one still live:
    until ``until``, or the last record when None). A user refused and never assigned within an hour is one session
    of ``default_session_s`` that never got a mandelbox.
    """
    last_seen: datetime | None = None
    waiting: dict[str, tuple[datetime, str, str]] = {}  # actor -> first refusal (time, region, commit)
    started: dict[object, tuple[datetime, str, str, datetime]] = {}  # mandelbox -> (arrival, region, commit, assign)
    trace: list[SessionRequest] = []
    for kind, actor, created_at, mandelbox_id, detail in records:
        last_seen = created_at if last_seen is None or created_at > last_seen else last_seen
        commit = str(detail.get("client_commit_hash", ""))
        if kind == EventKind.ASSIGNMENT_REFUSED:
            regions = detail.get("regions") or []
            first = waiting.get(actor)
            if first is not None and (created_at - first[0]).total_seconds() > EXPORT_GIVE_UP_S:
                trace.append(SessionRequest(first[0], first[1], first[2], default_session_s))
                first = None
            if first is None and regions:
                waiting[actor] = (created_at, str(regions[0]), commit)
        elif kind == EventKind.MANDELBOX_ASSIGNED:
            first = waiting.pop(actor, None)
            arrival = first[0] if first is not None else created_at
            started[mandelbox_id] = (arrival, str(detail.get("region", "")), commit, created_at)
        elif detail.get("to") == "EXITED" and mandelbox_id in started:
            arrival, region, commit, assigned_at = started.pop(mandelbox_id)
            trace.append(SessionRequest(arrival, region, commit, max(1.0, (created_at - assigned_at).total_seconds())))
    # A mandelbox still live at the end of the export lasted at least until then (``until``, or the last record).
    end = min(until, last_seen) if until is not None and last_seen is not None else (last_seen or until)
    for arrival, region, commit, assigned_at in started.values():
        length = (end - assigned_at).total_seconds() if end is not None else default_session_s
        trace.append(SessionRequest(arrival, region, commit, max(1.0, length)))
    for first in waiting.values():
        trace.append(SessionRequest(first[0], first[1], first[2], default_session_s))
    return sorted(trace)


# --- synthetic --------------------------------------------------------------------------------------------------

DEFAULT_REGIONS = (
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "ca-central-1",
    "sa-east-1",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-central-1",
    "eu-north-1",
    "eu-south-1",
    "me-south-1",
    "af-south-1",
    "ap-south-1",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-east-1",
)
# Rough UTC offsets of the regions' users: the evening peak moves round the globe.
REGION_UTC_OFFSET_H = {
    "us-east-1": -5,
    "us-east-2": -5,
    "us-west-1": -8,
    "us-west-2": -8,
    "ca-central-1": -5,
    "sa-east-1": -3,
    "eu-west-1": 0,
    "eu-west-2": 0,
    "eu-west-3": 1,
    "eu-central-1": 1,
    "eu-north-1": 1,
    "eu-south-1": 1,
    "me-south-1": 3,
    "af-south-1": 2,
    "ap-south-1": 5,
    "ap-southeast-1": 8,
    "ap-southeast-2": 10,
    "ap-northeast-1": 9,
    "ap-northeast-2": 9,
    "ap-east-1": 8,
}


@dataclass(frozen=True)
class Spike:
    """Demand in ``region`` (every region when None) is ``factor`` times the curve for ``minutes`` from ``start_h``
    hours after the trace starts."""

    start_h: float
    minutes: float
    factor: float
    region: str | None = None


@dataclass(frozen=True)
class SyntheticSpec:
    sessions: int = 2000
    regions: Sequence[str] = ("us-east-1", "eu-west-1", "ap-southeast-1")
    start: datetime = datetime(2026, 11, 24, tzinfo=UTC)
    hours: float = 24.0
    peak_local_hour: float = 20.0
    trough_share: float = 0.15  # the night's rate as a share of the peak's
    median_session_s: float = 1800.0
    session_sigma: float = 0.8
    max_session_s: float = 4 * 3600.0
    spikes: Sequence[Spike] = field(default_factory=lambda: (Spike(start_h=13.0, minutes=30, factor=3.0),))
    old_version: str = "v1"
    new_version: str | None = "v2"
    rollout_start_h: float = 10.0
    rollout_hours: float = 4.0
    region_weights: dict[str, float] = field(default_factory=dict)  # relative volume per region (default 1)


def region_weight(spec: SyntheticSpec, region: str, at: datetime) -> float:
    """The relative arrival rate of ``region`` at ``at``: a daily cosine peaking at the local evening, plus spikes."""
    local_h = (at.hour + at.minute / 60 + REGION_UTC_OFFSET_H.get(region, 0)) % 24
    shape = (1 + math.cos(2 * math.pi * (local_h - spec.peak_local_hour) / 24)) / 2
    weight = (spec.trough_share + (1 - spec.trough_share) * shape) * spec.region_weights.get(region, 1.0)
    hours_in = (at - spec.start).total_seconds() / 3600
    for spike in spec.spikes:
        if (spike.region is None or spike.region == region) and 0 <= (hours_in - spike.start_h) * 60 < spike.minutes:
            weight *= spike.factor
    return weight


def synthetic_trace(spec: SyntheticSpec, *, seed: int = 0) -> list[SessionRequest]:
    """``spec.sessions`` sessions drawn minute by minute from each region's curve; deterministic for ``seed``."""
    rng = random.Random(seed)
    minutes = max(1, int(spec.hours * 60))
    cells: list[tuple[str, int]] = []
    weights: list[float] = []
    for minute in range(minutes):
        at = spec.start + timedelta(minutes=minute)
        for region in spec.regions:
            cells.append((region, minute))
            weights.append(region_weight(spec, region, at))
    chosen = rng.choices(cells, weights=weights, k=spec.sessions)
    trace = []
    for region, minute in chosen:
        arrival = spec.start + timedelta(minutes=minute, seconds=rng.random() * 60)
        hours_in = (arrival - spec.start).total_seconds() / 3600
        version = spec.old_version
        if spec.new_version is not None:
            share_new = min(1.0, max(0.0, (hours_in - spec.rollout_start_h) / max(spec.rollout_hours, 1e-9)))
            if rng.random() < share_new:
                version = spec.new_version
        length = min(spec.max_session_s, rng.lognormvariate(math.log(spec.median_session_s), spec.session_sigma))
        trace.append(SessionRequest(arrival.replace(microsecond=0), region, version, round(max(30.0, length), 1)))
    return sorted(trace)
