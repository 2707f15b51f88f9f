"""Replay a demand trace through the real scaler pass and the real assignment service, on a virtual clock.

The simulator owns only what is outside Fractal: the users (they ask, retry every Retry-After after a 503, give
up after a while, end their session), the hosts (they boot after a drawn delay, shake hands through the host
service, heartbeat, report their mandelboxes running and exited) and the cloud (``SimulatedCloud``). Everything
Fractal decides — which host gets a user, what the scaler launches, drains and terminates — is the production
code: ``assign_mandelbox``, ``handshake_host``, the fleet's movers and ``reconcile_fleet``, unchanged, against a
throwaway in-memory SQLite database whose clock (``db_now``) is the virtual one
(``fractal.clock.attach_virtual_clock``). Asks that the free slots show can only be refused get the service's
answer and event without the call (``Simulation._serve_users``); every ask that can succeed goes through
``assign_mandelbox``.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from cachelib import SimpleCache
from sqlalchemy import Table, bindparam, case, event, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from fractal.admin.schemas import BufferPolicyIn
from fractal.assignment.service import NO_CAPACITY_RETRY_AFTER_S, assign_mandelbox, refusal_event
from fractal.cache import DataCache
from fractal.clock import attach_virtual_clock, virtual_clock_ddl
from fractal.config import Environment, Settings
from fractal.database import DriverStatement, SessionFactory, create_db_engine, create_session_factory, in_values
from fractal.errors import CommitHashMismatchError, FractalError, NoInstanceAvailableError
from fractal.events import record_events
from fractal.fleet.mandelboxes import move_mandelboxes
from fractal.host_service.service import handshake_host
from fractal.images import ImageSpec, active_image_summary, upsert_image
from fractal.models import Base, EndReason, Heartbeat, Instance, InstanceStatus, Mandelbox, MandelboxStatus
from fractal.scaling.demand import DemandCache
from fractal.scaling.policy import LaunchPlan
from fractal.scaling.reconcile import ReconcileReport, reconcile_fleet
from fractal.scaling.steps import NOT_TERMINATED
from fractal.simulation.cloud import BootDistribution, SimulatedCloud
from fractal.simulation.trace import SessionRequest

# On-demand Linux prices (USD per hour, us-east-1, late 2026) of the GPU types Fractal images use; override with
# SimulationConfig.prices. An unknown type costs DEFAULT_PRICE.
PRICES_USD_PER_HOUR = {
    "g4dn.xlarge": 0.526,
    "g4dn.2xlarge": 0.752,
    "g4dn.4xlarge": 1.204,
    "g4dn.12xlarge": 3.912,
    "g5.xlarge": 1.006,
    "g5.2xlarge": 1.212,
    "g5.4xlarge": 1.624,
}
DEFAULT_PRICE = 1.0
SIM_ACTOR = "simulator"
# What assign_mandelbox raises when nothing has room (see Simulation._regions_without_room).
_NO_ROOM = NoInstanceAvailableError(retry_after_s=NO_CAPACITY_RETRY_AFTER_S)
# What it raises when only other versions have room in the region.
_OTHER_VERSION = CommitHashMismatchError(details={})


# The simulator's own statements pass their lists as one JSON array (``json_each``) rather than as an expanding IN:
# the statement's text is then the same whatever the list's length, so it is compiled once and run on the driver
# (DriverStatement), and SQLite prepares it once, where an IN list is rendered and prepared anew for every length.

# The free slots on ACTIVE instances per (region, version) of some regions (the simulator reads it at every tick
# with asks). On the partial index of ACTIVE hosts by (region, version), pinned as the take-a-slot statement pins it
# (fleet/mandelboxes.py): SQLite would otherwise read every ACTIVE host and sort them.
_FREE_SLOTS = DriverStatement(
    text(
        """
SELECT region, client_commit_hash, sum(mandelbox_capacity - live_mandelboxes)
FROM instances INDEXED BY ix_instances_assignable
WHERE status = 'ACTIVE' AND region IN (SELECT value FROM json_each(:regions))
GROUP BY region, client_commit_hash
"""
    )
)

# Every running host's heartbeat, as one statement.
_HEARTBEATS = DriverStatement(
    text(
        """
UPDATE heartbeats SET last_heartbeat_at = :now
WHERE instance_name IN (SELECT value FROM json_each(:names))
"""
    ).bindparams(bindparam("now", type_=cast(Table, Heartbeat.__table__).c.last_heartbeat_at.type))
)
# The hosts' reports name mandelboxes by id: one condition, so that the mover builds its statements once.
_BY_IDS = in_values(cast(Table, Mandelbox.__table__).c.mandelbox_id, "ids")


@dataclass(frozen=True)
class Policy:
    """A buffer policy to simulate, as every image of the run gets it: ``static`` (the settings default target),
    ``static:N`` (``target_free`` N), or ``demand[:key=value,...]`` (a ``buffer_policy``; keys ``safety``,
    ``window``, ``floor``, ``ceiling``, ``lead``, ``schedule=H-H@N`` for a minimum N in UTC hours H to H)."""

    name: str
    target_free: int | None = None
    buffer_policy: dict[str, Any] | None = None

    @classmethod
    def parse(cls, text: str) -> Policy:
        kind, _, rest = text.partition(":")
        if kind == "static":
            if not rest:
                return cls(text)
            if not rest.isdigit():
                raise ValueError(f"policy {text!r}: static:N wants a whole number")
            return cls(text, target_free=int(rest))
        if kind != "demand":
            raise ValueError(f"policy {text!r}: want static, static:N or demand[:key=value,...]")
        names = {"safety": "safety_factor", "window": "window_s", "floor": "floor", "ceiling": "ceiling"}
        names["lead"] = "default_lead_time_s"
        body: dict[str, Any] = {"kind": "demand", "schedule": []}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key == "schedule":
                hours, _, minimum = value.partition("@")
                start, _, end = hours.partition("-")
                span = range(int(start), int(end or start) + 1)
                body["schedule"].append({"hours_utc": list(span), "min_free": int(minimum)})
            elif key in names:
                body[names[key]] = int(value) if key in ("floor", "ceiling") else float(value)
            else:
                raise ValueError(f"policy {text!r}: unknown key {key!r} (have {', '.join([*names, 'schedule'])})")
        validated = BufferPolicyIn.model_validate(body, strict=False)  # the admin API's own validation
        return cls(text, buffer_policy=validated.model_dump())


@dataclass(frozen=True)
class SimulationConfig:
    seed: int = 0
    tick_s: float = 5.0
    retry_s: float = float(NO_CAPACITY_RETRY_AFTER_S)  # users retry after the 503's Retry-After
    give_up_s: float = 600.0  # a user still without a mandelbox this long after arriving leaves
    boot: BootDistribution = field(default_factory=BootDistribution)
    launch_failure_rate: float = 0.0
    region_capacity: int | None = None  # hosts the cloud runs per region at most (then InsufficientCapacity)
    instance_type: str = "g4dn.xlarge"
    mandelbox_capacity: int = 4
    prices: dict[str, float] = field(default_factory=lambda: dict(PRICES_USD_PER_HOUR))
    default_target_free: int = 10  # FRACTAL_TARGET_FREE_MANDELBOXES: what "static" means
    scaler_interval_s: float = 15.0
    scale_down_delay_s: float = 300.0
    max_instances_per_region: int = 100
    boot_timeout_s: float = 900.0
    heartbeat_interval_s: float = 20.0  # one batched heartbeat statement per interval (hosts time out after 60 s)
    warmup_s: float = 600.0  # images are published this long before the first session that wants them
    sample_s: float = 60.0


@dataclass
class RegionResult:
    region: str
    sessions: int = 0
    served: int = 0
    refused: int = 0  # gave up without a mandelbox
    wait_p50_s: float = 0.0
    wait_p95_s: float = 0.0
    wait_p99_s: float = 0.0
    wait_mean_s: float = 0.0
    refusals_503: int = 0  # assign answers that were 503 (every retry counts)
    instance_hours: float = 0.0
    busy_hours: float = 0.0
    idle_hours: float = 0.0
    launches: int = 0
    terminations: int = 0
    launch_failures: int = 0
    capacity_errors: int = 0
    cost_usd: float = 0.0

    @property
    def refused_share(self) -> float:
        return self.refused / self.sessions if self.sessions else 0.0


@dataclass(frozen=True)
class Sample:
    at: datetime
    demand: int  # live mandelboxes plus users waiting for one
    capacity: int  # slots on ACTIVE hosts
    free: int  # free slots on ACTIVE hosts
    booting: int  # hosts in PRE_CONNECTION


@dataclass
class SimulationResult:
    policy: str
    seed: int
    overall: RegionResult
    regions: list[RegionResult]
    series: list[Sample]
    started_at: datetime
    ended_at: datetime
    elapsed_s: float = 0.0
    scaler_passes: int = 0
    assign_calls: int = 0
    service_calls: int = 0  # assign answers that came from assign_mandelbox (the others were known refusals)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per part of the ticks

    def as_dict(self) -> dict[str, Any]:
        def region(r: RegionResult) -> dict[str, Any]:
            return {**asdict(r), "refused_share": round(r.refused_share, 6)}

        return {
            "policy": self.policy,
            "seed": self.seed,
            "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat(),
            "elapsed_s": round(self.elapsed_s, 3),
            "scaler_passes": self.scaler_passes,
            "assign_calls": self.assign_calls,
            "service_calls": self.service_calls,
            "overall": region(self.overall),
            "regions": [region(r) for r in self.regions],
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


@dataclass
class _User:
    index: int
    request: SessionRequest
    tries: int = 0
    done: bool = False
    first_refused_at: datetime | None = None  # the first 503: the wait runs from here to the 201


class _PhaseClock:
    """Adds the CPU time since the last lap to ``into[name]``."""

    def __init__(self, into: defaultdict[str, float]) -> None:
        self.into = into
        self.last = time.process_time()

    def lap(self, name: str) -> None:
        now = time.process_time()
        self.into[name] += now - self.last
        self.last = now


class Simulation:
    """One run of one policy over one trace. ``run()`` does it all; the steps are public for tests."""

    def __init__(
        self,
        trace: Sequence[SessionRequest],
        policy: Policy,
        config: SimulationConfig | None = None,
        *,
        workdir: Path | None = None,
        window: tuple[datetime, datetime] | None = None,
    ) -> None:
        """``window``: when this runs from and until (``trace_window`` of the whole trace when this simulates a
        part of it, so that every part's scaler passes, heartbeats and samples fall at the same instants); the
        trace's own window by default."""
        if not trace:
            raise ValueError("the trace has no sessions")
        self.trace = sorted(trace)
        self.policy = policy
        self.config = config or SimulationConfig()
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="fractal-sim-"))
        cfg = self.config
        self.started_at, self.ends_at = window or trace_window(self.trace, cfg)
        self.now = self.started_at
        self._rngs: dict[str, random.Random] = {}
        self.cloud = SimulatedCloud(
            lambda: self.now,
            rng=self.rng_for,
            boot=cfg.boot,
            launch_failure_rate=cfg.launch_failure_rate,
            region_capacity=cfg.region_capacity,
        )
        self.settings = Settings(
            # A throwaway development database whatever this shell's FRACTAL_ENV (production demands secrets).
            env=Environment.DEVELOPMENT,
            # In memory, one shared connection (StaticPool): a throwaway database has nothing to keep on disk.
            database_url="sqlite:///:memory:",
            target_free_mandelboxes=cfg.default_target_free,
            scaler_interval_s=cfg.scaler_interval_s,
            scale_down_delay_s=cfg.scale_down_delay_s,
            max_instances_per_region=cfg.max_instances_per_region,
            boot_timeout_s=cfg.boot_timeout_s,
            heartbeat_interval_s=cfg.heartbeat_interval_s,
            host_timeout_s=max(60.0, 6 * cfg.heartbeat_interval_s),
            connect_timeout_s=90.0,
            host_api_url="http://simulated-host-api.invalid",
        )
        self.engine = self._create_database()
        self.session_factory: SessionFactory = create_session_factory(self.engine)
        # The hosts' and users' session works on one connection of its own for the whole run: a session bound to
        # the engine checks a connection out and wraps it anew for every transaction, a fifth of an assign's CPU
        # here. Nothing else uses this connection, so each of the session's transactions is its own (the scaler's
        # sessions still come from the engine; in memory, every connection is the same database connection).
        self._connection = self.engine.connect()
        self.session: Session = create_session_factory(self._connection)()
        self.cache = DataCache(SimpleCache(threshold=100), ttl_s=3600)
        self._names = 0
        self._users = [_User(i, r) for i, r in enumerate(self.trace)]
        self._next_arrival = 0
        self._retries: list[tuple[datetime, int]] = []  # heap of (next try, user index)
        self._ends: list[tuple[datetime, uuid.UUID]] = []  # heap of (session end, mandelbox id)
        self._unclaimed: list[uuid.UUID] = []
        self._waits: dict[str, list[float]] = defaultdict(list)
        self._results: dict[str, RegionResult] = {}
        self._waiting: Counter[str] = Counter()
        self._busy_hours: dict[str, float] = defaultdict(float)
        self._series: list[Sample] = []
        self._schedule = self._image_schedule()
        self._next_heartbeat = self.started_at
        self._next_scaler = self.started_at
        self._next_sample = self.started_at
        self.scaler_passes = 0
        self.assign_calls = 0  # answers users got (every retry counts)
        self.service_calls = 0  # of which assign_mandelbox gave (the others: refusals known beforehand)
        self.cpu_s: defaultdict[str, float] = defaultdict(float)  # CPU seconds: hosts, users, scaler, sample
        self.last_report: ReconcileReport | None = None
        self.demand_cache = DemandCache()  # what the live scaler loop keeps too (ScalerLoop)

    # --- set-up ------------------------------------------------------------------------------------------------

    def _create_database(self) -> Engine:
        engine = create_db_engine(self.settings)

        @event.listens_for(engine, "connect")
        def _fast(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # A throwaway database: durability buys nothing.
            for pragma in ("synchronous=OFF", "journal_mode=MEMORY", "temp_store=MEMORY"):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        attach_virtual_clock(engine, lambda: self.now)

        def _ddl(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> Any:
            return virtual_clock_ddl(statement), parameters

        with engine.begin() as connection:
            # On this connection only: a cursor listener on the engine, even once removed, leaves the engine marked
            # as having some, and every DriverStatement then looks them up (see fractal.database._seen_by_sqlalchemy).
            event.listen(connection, "before_cursor_execute", _ddl, retval=True)
            Base.metadata.create_all(connection)
        return engine

    def _image_schedule(self) -> list[tuple[datetime, str, str, bool]]:
        """When each (region, version) image is published (``warmup_s`` before its first session) and retired (after
        its last session, once a newer version exists in the region): what an operator rolling out would do."""
        first: dict[tuple[str, str], datetime] = {}
        last: dict[tuple[str, str], datetime] = {}
        for item in self.trace:
            key = (item.region, item.client_commit_hash)
            first.setdefault(key, item.arrival)
            last[key] = item.arrival
        changes = []
        for key, start in first.items():
            changes.append((max(self.started_at, start - timedelta(seconds=self.config.warmup_s)), *key, True))
            newer = any(k[0] == key[0] and other > start for k, other in first.items() if k != key)
            if newer:
                changes.append((last[key] + timedelta(seconds=self.config.tick_s), *key, False))
        return sorted(changes, key=lambda c: (c[0], c[1], c[2], not c[3]))

    def rng_for(self, region: str) -> random.Random:
        """The region's own random draws (boot times, launch failures), seeded by the seed and the region alone: a
        region's run is the same whether it is simulated alone or with others (``simulate(workers=...)``)."""
        if region not in self._rngs:
            self._rngs[region] = random.Random(f"fractal-sim:{self.config.seed}:{region}")
        return self._rngs[region]

    def instance_name(self, plan: LaunchPlan) -> str:
        self._names += 1
        return f"{plan.region}-{plan.client_commit_hash[:8]}-{self._names:06d}"

    # --- the run -----------------------------------------------------------------------------------------------

    def run(self) -> SimulationResult:
        started = time.perf_counter()
        try:
            self.run_to_end()
            result = self.result()
        finally:
            self.close()
        result.elapsed_s = time.perf_counter() - started
        return result

    def run_to_end(self) -> None:
        """Every tick of the window, in order (ticks where nothing would happen are skipped)."""
        while self.now <= self.ends_at:
            self.step()
            self.now = self.next_time()

    def next_time(self) -> datetime:
        """The next tick at which anything happens (ticks where nothing would are skipped: same outcome, faster)."""
        candidates = [self._next_scaler, self._next_sample, self._next_heartbeat]
        if self._next_arrival < len(self._users):
            candidates.append(self._users[self._next_arrival].request.arrival)
        for heap in (self._retries, self._ends):
            if heap:
                candidates.append(heap[0][0])
        if self._schedule:
            candidates.append(self._schedule[0][0])
        boot = self.cloud.next_boot_at()
        if boot is not None:
            candidates.append(boot)
        tick = self.config.tick_s
        ticks = math.ceil((min(candidates) - self.started_at).total_seconds() / tick - 1e-9)
        return max(self.now + timedelta(seconds=tick), self.started_at + timedelta(seconds=ticks * tick))

    def step(self) -> None:
        """One tick at ``self.now``: images, hosts, sessions, users, the scaler, a sample."""
        now = self.now
        clock = _PhaseClock(self.cpu_s)
        self._apply_images(now)
        self._boot_hosts(now)
        self._end_sessions(now)
        clock.lap("hosts")
        self._serve_users(now)
        clock.lap("users")
        if now >= self._next_heartbeat:
            # The hosts' reports ride on the heartbeat cadence: one batch of claims, one of heartbeats (well within
            # FRACTAL_CONNECT_TIMEOUT_S and FRACTAL_HOST_TIMEOUT_S).
            self._claim()
            self._heartbeat(now)
            self._next_heartbeat = now + timedelta(seconds=self.config.heartbeat_interval_s)
            clock.lap("hosts")
        if now >= self._next_scaler:
            self.scaler_step()
            self._next_scaler = now + timedelta(seconds=self.config.scaler_interval_s)
            clock.lap("scaler")
        if now >= self._next_sample:
            self._sample(now)
            self._next_sample = now + timedelta(seconds=self.config.sample_s)
            clock.lap("sample")

    def scaler_step(self) -> ReconcileReport:
        """One scaler pass: the live scaler's ``reconcile_fleet``, its clock the database's (virtual) one."""
        report = reconcile_fleet(
            self.session_factory,
            settings=self.settings,
            cloud=self.cloud,
            instance_namer=self.instance_name,
            demand_cache=self.demand_cache,
        )
        self.scaler_passes += 1
        self.last_report = report
        return report

    def _apply_images(self, now: datetime) -> None:
        while self._schedule and self._schedule[0][0] <= now:
            _, region, commit, active = self._schedule.pop(0)
            upsert_image(
                self.session,
                region=region,
                client_commit_hash=commit,
                spec=ImageSpec(
                    ami_id=f"ami-sim-{commit[:16]}",
                    active=active,
                    instance_type=self.config.instance_type,
                    mandelbox_capacity=self.config.mandelbox_capacity,
                    target_free=self.policy.target_free,
                    buffer_policy=self.policy.buffer_policy,
                ),
                actor=SIM_ACTOR,
                cache=self.cache,
            )

    def _boot_hosts(self, now: datetime) -> None:
        for host in self.cloud.due_boots(now):
            try:
                handshake_host(
                    self.session,
                    authenticated_instance=host.instance_name,
                    instance_name=host.instance_name,
                    ip=host.ip,
                    client_commit_hash=host.client_commit_hash,
                    mandelbox_capacity=host.mandelbox_capacity,
                    heartbeat_interval_s=self.config.heartbeat_interval_s,
                    now=now,
                )
            except FractalError:
                self.session.rollback()  # retired before it came up (boot timeout): the scaler terminates it

    def _heartbeat(self, now: datetime) -> None:
        """Every running host heartbeats: one statement for the fleet (what each host's heartbeat writes)."""
        names = self.cloud.up_names_json()
        if names != "[]":
            _HEARTBEATS.execute(self.session, {"names": names, "now": now})
            self.session.commit()

    def _end_sessions(self, now: datetime) -> None:
        ended = []
        while self._ends and self._ends[0][0] <= now:
            ended.append(heapq.heappop(self._ends)[1])
        if ended:  # the hosts report the mandelboxes EXITED: the fleet's mover returns their slots
            move_mandelboxes(
                self.session,
                where=_BY_IDS,
                params={"ids": ended},
                to=MandelboxStatus.EXITED,
                reason=EndReason.HOST_EXITED,
                actor=SIM_ACTOR,
            )
            self.session.commit()

    def _claim(self) -> None:
        if not self._unclaimed:
            return
        claimed = {"ids": self._unclaimed}
        for status in (MandelboxStatus.CONNECTING, MandelboxStatus.RUNNING):  # the client connects
            move_mandelboxes(self.session, where=_BY_IDS, params=claimed, to=status, actor=SIM_ACTOR)
        self.session.commit()
        self._unclaimed = []

    def _due_users(self, now: datetime) -> list[int]:
        """Users asking at this tick: new arrivals and retries, the longest-waiting first."""
        due: list[int] = []
        while self._next_arrival < len(self._users) and self._users[self._next_arrival].request.arrival <= now:
            user = self._users[self._next_arrival]
            due.append(user.index)
            self._result(user.request.region).sessions += 1
            self._next_arrival += 1
        while self._retries and self._retries[0][0] <= now:
            due.append(heapq.heappop(self._retries)[1])
        return sorted(due)  # indices are in arrival order

    def _free_slots(self, regions: Collection[str]) -> tuple[set[str], Counter[tuple[str, str]]]:
        """The enabled regions, and the free slots on ACTIVE instances per (region, version) of ``regions`` (those
        of the users asking: no other region's count is looked at), at this instant."""
        enabled = set(active_image_summary(self.session, cache=self.cache)["regions"])
        rows = _FREE_SLOTS.execute(self.session, {"regions": json.dumps(sorted(regions))}).rows
        # No commit of its own: the read opens the transaction the tick's first ask then continues (a request's
        # session does the same with the rate limit's read), and every ask ends it (_serve_users).
        return enabled, Counter({(region, commit): int(free) for region, commit, free in rows if free})

    def _serve_users(self, now: datetime) -> None:
        due = self._due_users(now)
        if not due:
            return
        # Asks that can only be refused are answered here, with the event the service would record (the scaler's
        # demand reads count them), in one statement: the same outcome as calling the service, for a fraction of
        # its cost. Which they are follows from the free slots per (region, version), read once per tick and kept
        # exact through it (only assigns run in between, and each takes one slot of its own region and version):
        # in an enabled region (the service's first check) a simulated user asking holds no live mandelbox, so
        # with no room for its version the service answers COMMIT_HASH_MISMATCH when another version has room in
        # the region, else NO_INSTANCE_AVAILABLE (``_assign_in_transaction``'s order).
        enabled, free = self._free_slots({self._users[index].request.region for index in due})
        refusals: list[dict[str, Any]] = []
        for index in due:
            user = self._users[index]
            request = user.request
            region = self._result(request.region)
            if user.first_refused_at is not None:
                self._waiting[request.region] -= 1
            user.tries += 1
            self.assign_calls += 1
            commit = request.client_commit_hash
            if request.region in enabled and not free[(request.region, commit)]:
                room_elsewhere = any(n for (r, _), n in free.items() if r == request.region)
                error = _OTHER_VERSION if room_elsewhere else _NO_ROOM
                asked = [request.region]
                refusals.append(refusal_event(user_id=f"sim-{index}", regions=asked, commit=commit, error=error))
                self._refused(user, now)
                continue
            self.service_calls += 1
            try:
                result = assign_mandelbox(
                    self.session,
                    user_id=f"sim-{index}",
                    regions=[request.region],
                    client_commit_hash=request.client_commit_hash,
                    max_per_user=1,
                    cache=self.cache,
                )
            except FractalError:
                self._refused(user, now)
                continue
            free[(result.assignment.region, commit)] -= 1
            mandelbox_id = result.assignment.mandelbox_id
            region.served += 1
            waited = (now - user.first_refused_at).total_seconds() if user.first_refused_at else 0.0
            self._waits[request.region].append(waited)
            user.done = True
            heapq.heappush(self._ends, (now + timedelta(seconds=request.session_s), mandelbox_id))
            self._unclaimed.append(mandelbox_id)
        if refusals:
            record_events(self.session, refusals)
            self.session.commit()

    def _refused(self, user: _User, now: datetime) -> None:
        """A 503: the user retries after Retry-After, or gives up when that would pass ``give_up_s``."""
        request = user.request
        region = self._result(request.region)
        region.refusals_503 += 1
        user.first_refused_at = user.first_refused_at or now
        waited = (now - user.first_refused_at).total_seconds()
        if waited + self.config.retry_s > self.config.give_up_s:
            region.refused += 1
            self._waits[request.region].append(self.config.give_up_s)
            user.done = True
        else:
            heapq.heappush(self._retries, (now + timedelta(seconds=self.config.retry_s), user.index))
            self._waiting[request.region] += 1

    def _sample(self, now: datetime) -> None:
        rows = self.session.execute(
            select(
                Instance.region,
                Instance.status,
                func.count(),
                func.coalesce(func.sum(Instance.mandelbox_capacity), 0),
                func.coalesce(func.sum(Instance.live_mandelboxes), 0),
                func.coalesce(func.sum(case((Instance.live_mandelboxes > 0, 1), else_=0)), 0),
            )
            .where(Instance.status.in_(NOT_TERMINATED))  # the status index, not every row ever made
            .group_by(Instance.region, Instance.status)
        ).all()
        self.session.commit()
        demand = capacity = free = booting = 0
        for region, status, count, slots, live, busy in rows:
            demand += int(live)
            self._busy_hours[region] += int(busy) * self.config.sample_s / 3600
            if status == InstanceStatus.ACTIVE:
                capacity += int(slots)
                free += int(slots) - int(live)
            elif status == InstanceStatus.PRE_CONNECTION:
                booting += int(count)
        demand += sum(self._waiting.values())
        self._series.append(Sample(now, demand, capacity, free, booting))

    def _result(self, region: str) -> RegionResult:
        if region not in self._results:
            self._results[region] = RegionResult(region)
        return self._results[region]

    # --- results -----------------------------------------------------------------------------------------------

    def result(self) -> SimulationResult:
        return merge_outcomes(self.policy.name, self.config, self.started_at, [self.outcome()])

    def outcome(self) -> RegionsOutcome:
        """What this run found, per region, unrounded: what ``merge_outcomes`` adds up with other parts'. Hosts are
        billed until the window's end (``ends_at``), whichever tick came last."""
        until = min(self.now, self.ends_at)
        results = {name: replace(item) for name, item in self._results.items()}

        def region_result(region: str) -> RegionResult:
            return results.setdefault(region, RegionResult(region))

        for (region, instance_type), hours in self.cloud.billed_hours(until).items():
            item = region_result(region)
            item.instance_hours += hours
            item.cost_usd += hours * self.config.prices.get(instance_type, DEFAULT_PRICE)
        for host in self.cloud.hosts.values():
            item = region_result(host.region)
            item.launches += 1
            item.terminations += host.terminated_at is not None
        for region, count in self.cloud.launch_failures.items():
            region_result(region).launch_failures += count
        for region, count in self.cloud.capacity_errors.items():
            region_result(region).capacity_errors += count
        for name, item in results.items():
            item.busy_hours = min(self._busy_hours.get(name, 0.0), item.instance_hours)
            item.idle_hours = max(0.0, item.instance_hours - item.busy_hours)
        return RegionsOutcome(
            regions=results,
            waits={name: list(self._waits.get(name, [])) for name in results},
            series=list(self._series),
            scaler_passes=self.scaler_passes,
            assign_calls=self.assign_calls,
            service_calls=self.service_calls,
            cpu_s=dict(self.cpu_s),
            ended_at=until,
        )

    def save_database(self, path: Path) -> Path:
        """Copy the (in-memory) database to a SQLite file at ``path``, as it stands now (for tools and tests)."""
        self.session.commit()
        raw = self.engine.raw_connection()  # StaticPool: the simulation's one connection
        try:
            with sqlite3.connect(path) as target:
                raw.driver_connection.backup(target)  # type: ignore[union-attr]
        finally:
            raw.close()
        return path

    def close(self) -> None:
        self.session.close()
        self._connection.close()
        self.engine.dispose()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _fill_waits(item: RegionResult, waits: Sequence[float]) -> None:
    item.wait_p50_s = round(percentile(waits, 50), 3)
    item.wait_p95_s = round(percentile(waits, 95), 3)
    item.wait_p99_s = round(percentile(waits, 99), 3)
    item.wait_mean_s = round(sum(waits) / len(waits), 3) if waits else 0.0


def trace_window(trace: Sequence[SessionRequest], config: SimulationConfig) -> tuple[datetime, datetime]:
    """When a run of ``trace`` starts (``warmup_s`` before its first arrival's minute) and ends (its last user can
    have given up)."""
    first = min(item.arrival for item in trace).replace(second=0, microsecond=0)
    last = max(item.arrival for item in trace)
    return first - timedelta(seconds=config.warmup_s), last + timedelta(seconds=config.give_up_s + config.tick_s)


@dataclass
class RegionsOutcome:
    """A run's findings for the regions it simulated, unrounded (picklable: a worker process sends it back)."""

    regions: dict[str, RegionResult]  # busy and idle hours filled, the waits not yet
    waits: dict[str, list[float]]  # each user's wait, per region
    series: list[Sample]
    scaler_passes: int
    assign_calls: int
    service_calls: int
    cpu_s: dict[str, float]
    ended_at: datetime  # the run's last instant (its hosts are billed until then)
    elapsed_s: float = 0.0


_SUMMED = (
    "sessions",
    "served",
    "refused",
    "refusals_503",
    "instance_hours",
    "busy_hours",
    "idle_hours",
    "launches",
    "terminations",
    "launch_failures",
    "capacity_errors",
    "cost_usd",
)


def merge_outcomes(
    policy: str,
    config: SimulationConfig,
    started_at: datetime,
    outcomes: Sequence[RegionsOutcome],
) -> SimulationResult:
    """One result from the runs of disjoint sets of regions over the same window: each region's figures as its run
    found them, the overall ones from every region's (percentiles over all users' waits, hours and costs summed,
    regions in name order whatever the order of ``outcomes``), samples summed per instant. Scaler passes are the
    passes of one run (every run passes at the same instants); asks, service calls and CPU seconds are summed."""
    found: dict[str, RegionResult] = {}
    waits: dict[str, list[float]] = {}
    series: dict[datetime, list[int]] = {}
    cpu_s: defaultdict[str, float] = defaultdict(float)
    for outcome in outcomes:
        for name, item in outcome.regions.items():
            if name in found:
                raise ValueError(f"region {name} was simulated twice")
            found[name] = replace(item)
            waits[name] = outcome.waits.get(name, [])
        for sample in outcome.series:
            sums = series.setdefault(sample.at, [0, 0, 0, 0])
            for i, value in enumerate((sample.demand, sample.capacity, sample.free, sample.booting)):
                sums[i] += value
        for part, seconds in outcome.cpu_s.items():
            cpu_s[part] += seconds
    overall = RegionResult("overall")
    all_waits: list[float] = []
    regions = [found[name] for name in sorted(found)]
    for item in regions:
        all_waits += waits[item.region]
        _fill_waits(item, waits[item.region])
        for attribute in _SUMMED:
            setattr(overall, attribute, getattr(overall, attribute) + getattr(item, attribute))
    _fill_waits(overall, all_waits)
    for item in [*regions, overall]:
        for attribute in ("instance_hours", "busy_hours", "idle_hours", "cost_usd"):
            setattr(item, attribute, round(getattr(item, attribute), 4))
    return SimulationResult(
        policy=policy,
        seed=config.seed,
        overall=overall,
        regions=regions,
        series=[Sample(at, *series[at]) for at in sorted(series)],
        started_at=started_at,
        ended_at=max(outcome.ended_at for outcome in outcomes),
        elapsed_s=sum(outcome.elapsed_s for outcome in outcomes),
        scaler_passes=max((outcome.scaler_passes for outcome in outcomes), default=0),
        assign_calls=sum(outcome.assign_calls for outcome in outcomes),
        service_calls=sum(outcome.service_calls for outcome in outcomes),
        cpu_s={name: round(seconds, 3) for name, seconds in sorted(cpu_s.items())},
    )


@dataclass(frozen=True)
class _RegionRun:
    """Some regions of one policy's run: what a worker process needs (picklable)."""

    policy_index: int
    policy: Policy
    trace: list[SessionRequest]
    config: SimulationConfig
    window: tuple[datetime, datetime]


def split_by_region(trace: Sequence[SessionRequest], parts: int) -> list[list[SessionRequest]]:
    """``trace`` in at most ``parts`` parts, each region's sessions all in one part, the parts about as big (the
    biggest region first into the smallest part), biggest first."""
    by_region: dict[str, list[SessionRequest]] = defaultdict(list)
    for item in trace:
        by_region[item.region].append(item)
    split: list[list[SessionRequest]] = [[] for _ in range(min(parts, len(by_region)))]
    for region in sorted(by_region, key=lambda name: (-len(by_region[name]), name)):
        min(split, key=len).extend(by_region[region])
    return sorted((sorted(part) for part in split), key=len, reverse=True)


def _run_region(run: _RegionRun) -> tuple[int, RegionsOutcome]:
    started = time.perf_counter()
    simulation = Simulation(run.trace, run.policy, run.config, window=run.window)
    try:
        simulation.run_to_end()
        outcome = simulation.outcome()
    finally:
        simulation.close()
    outcome.elapsed_s = time.perf_counter() - started
    return run.policy_index, outcome


def _quiet_worker() -> None:
    """A worker process's logs: warnings only, as the command line and the bench set them (a region's day is
    thousands of scaler passes, each logging a line)."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger().setLevel(logging.WARNING)


def simulate(
    trace: Sequence[SessionRequest],
    policy: Policy | str,
    config: SimulationConfig | None = None,
    *,
    workers: int = 1,
) -> SimulationResult:
    """Run ``policy`` over ``trace`` on throwaway databases; deterministic for ``config.seed``, whatever ``workers``.

    Users ask for one region and the scaler decides per (region, version), so each region is simulated on its own
    (its own database, its own random draws) over the whole trace's window, and the regions' results are merged
    (``merge_outcomes``); ``workers`` > 1 runs the regions in that many processes."""
    return compare(trace, [policy], config, workers=workers)[0]


def compare(
    trace: Sequence[SessionRequest],
    policies: Sequence[Policy | str],
    config: SimulationConfig | None = None,
    *,
    workers: int = 1,
) -> list[SimulationResult]:
    """Every policy over the same trace with the same seed (the same boots and failures for the same launches);
    ``workers`` processes share all policies' regions."""
    if not trace:
        raise ValueError("the trace has no sessions")
    if workers < 1:
        raise ValueError("workers must be at least 1")
    cfg = config or SimulationConfig()
    chosen = [Policy.parse(policy) if isinstance(policy, str) else policy for policy in policies]
    window = trace_window(trace, cfg)
    runs = [
        _RegionRun(index, policy, part, cfg, window)
        for index, policy in enumerate(chosen)
        for part in split_by_region(trace, workers)
    ]
    outcomes: dict[int, list[RegionsOutcome]] = defaultdict(list)
    finished: dict[int, float] = {}
    started = time.perf_counter()
    if workers == 1 or len(runs) == 1:
        done = map(_run_region, runs)
        for index, outcome in done:
            outcomes[index].append(outcome)
            finished[index] = time.perf_counter() - started
    else:
        import multiprocessing

        # spawn: a fresh interpreter, nothing of this process's connections, locks or threads carried over.
        context = multiprocessing.get_context("spawn")
        pool = context.Pool(min(workers, len(runs)), initializer=_quiet_worker)
        try:
            for index, outcome in pool.imap_unordered(_run_region, runs, chunksize=1):
                outcomes[index].append(outcome)
                finished[index] = time.perf_counter() - started
            pool.close()
        finally:
            pool.terminate()
            pool.join()
    results = []
    for index, policy in enumerate(chosen):
        result = merge_outcomes(policy.name, cfg, window[0], outcomes[index])
        result.elapsed_s = finished[index]  # wall seconds until this policy's last region was done
        results.append(result)
    return results
