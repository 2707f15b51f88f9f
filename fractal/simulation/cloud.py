"""The simulator's cloud: a CloudProvider on a virtual clock. Hosts boot after a drawn delay, some launches fail,
a region may run out of capacity; it remembers every host's launch and termination for the bill."""

from __future__ import annotations

import heapq
import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from fractal.cloud.base import CloudError, CloudHost, CloudState, HostRef, LaunchedHost, LaunchRequest


@dataclass(frozen=True)
class BootDistribution:
    """Seconds from launch until the host shakes hands: ``const:S``, ``uniform:LO:HI`` or ``lognormal:MEDIAN:SIGMA``."""

    kind: str = "lognormal"
    a: float = 120.0
    b: float = 0.25

    @classmethod
    def parse(cls, text: str) -> BootDistribution:
        parts = text.split(":")
        try:
            if parts[0] == "const" and len(parts) == 2:
                return cls("const", float(parts[1]), 0.0)
            if parts[0] in ("uniform", "lognormal") and len(parts) == 3:
                return cls(parts[0], float(parts[1]), float(parts[2]))
        except ValueError:
            pass
        raise ValueError(f"boot distribution {text!r}: want const:S, uniform:LO:HI or lognormal:MEDIAN:SIGMA")

    def draw(self, rng: random.Random) -> float:
        if self.kind == "const":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        return rng.lognormvariate(math.log(self.a), self.b)

    @property
    def median_s(self) -> float:
        return self.a if self.kind != "uniform" else (self.a + self.b) / 2

    def __str__(self) -> str:
        return f"const:{self.a:g}" if self.kind == "const" else f"{self.kind}:{self.a:g}:{self.b:g}"


@dataclass
class SimulatedHost:
    instance_name: str
    cloud_provider_id: str
    region: str
    client_commit_hash: str
    instance_type: str
    mandelbox_capacity: int
    ip: str
    launched_at: datetime
    boot_at: datetime
    booted: bool = False
    terminated_at: datetime | None = None

    @property
    def state(self) -> CloudState:
        if self.terminated_at is not None:
            return CloudState.TERMINATED
        return CloudState.RUNNING if self.booted else CloudState.PENDING


class SimulatedCloud:
    """CloudProvider for the simulator: nothing runs, every host is a record on the virtual clock ``now``."""

    name = "simulated"

    def __init__(
        self,
        now: Callable[[], datetime],
        *,
        rng: Callable[[str], random.Random],
        boot: BootDistribution,
        launch_failure_rate: float = 0.0,
        region_capacity: int | None = None,
    ) -> None:
        self._now = now
        self._rng = rng  # each region's own draws: a region's boots and failures do not depend on the others'
        self._boot = boot
        self._failure_rate = launch_failure_rate
        self._region_capacity = region_capacity
        self.hosts: dict[str, SimulatedHost] = {}
        self._by_name: dict[str, str] = {}
        self._running: Counter[str] = Counter()
        self._booting: list[tuple[datetime, str]] = []  # a heap of (boot_at, cloud id)
        self._up: dict[str, SimulatedHost] = {}
        self._up_json: str | None = None  # up_names_json's answer while the up hosts stay the same
        self.launch_failures: Counter[str] = Counter()
        self.capacity_errors: Counter[str] = Counter()

    def launch(self, request: LaunchRequest) -> LaunchedHost:
        existing = self._by_name.get(request.instance_name)
        if existing is not None:
            return LaunchedHost(request.instance_name, existing)
        if self._region_capacity is not None and self._running[request.region] >= self._region_capacity:
            self.capacity_errors[request.region] += 1
            raise CloudError(
                f"no {request.instance_type} capacity left in {request.region}",
                code="InsufficientInstanceCapacity",
                retryable=True,
            )
        rng = self._rng(request.region)
        if self._failure_rate > 0 and rng.random() < self._failure_rate:
            self.launch_failures[request.region] += 1
            raise CloudError("simulated launch failure", code="InternalError", retryable=True)
        now = self._now()
        n = len(self.hosts) + 1
        cloud_id = f"sim-{n:08d}"
        self.hosts[cloud_id] = SimulatedHost(
            instance_name=request.instance_name,
            cloud_provider_id=cloud_id,
            region=request.region,
            client_commit_hash=request.client_commit_hash,
            instance_type=request.instance_type,
            mandelbox_capacity=request.mandelbox_capacity,
            ip=f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}",
            launched_at=now,
            boot_at=now + timedelta(seconds=self._boot.draw(rng)),
        )
        self._by_name[request.instance_name] = cloud_id
        self._running[request.region] += 1
        heapq.heappush(self._booting, (self.hosts[cloud_id].boot_at, cloud_id))
        return LaunchedHost(request.instance_name, cloud_id)

    def terminate(self, region: str, cloud_provider_ids: Sequence[str]) -> None:
        now = self._now()
        for cloud_id in cloud_provider_ids:
            host = self.hosts.get(cloud_id)
            if host is not None and host.terminated_at is None:
                host.terminated_at = now
                self._running[host.region] -= 1
                if self._up.pop(cloud_id, None) is not None:
                    self._up_json = None

    def describe(self, region: str, hosts: Sequence[HostRef]) -> list[CloudHost]:
        ids = {h.cloud_provider_id for h in hosts if h.cloud_provider_id in self.hosts}
        ids |= {self._by_name[h.instance_name] for h in hosts if h.instance_name in self._by_name}
        return [CloudHost(self.hosts[i].instance_name, i, self.hosts[i].state) for i in sorted(ids)]

    def due_boots(self, now: datetime) -> list[SimulatedHost]:
        """Hosts whose boot finished by ``now`` and that have not shaken hands yet (marked booted here)."""
        due = []
        while self._booting and self._booting[0][0] <= now:
            _, cloud_id = heapq.heappop(self._booting)
            host = self.hosts[cloud_id]
            if host.terminated_at is None:
                host.booted = True
                self._up[cloud_id] = host
                self._up_json = None
                due.append(host)
        return due

    def next_boot_at(self) -> datetime | None:
        return self._booting[0][0] if self._booting else None

    def up(self) -> list[SimulatedHost]:
        """Booted hosts not terminated (they heartbeat)."""
        return list(self._up.values())

    def up_names_json(self) -> str:
        """The names of ``up()`` as one JSON array, in the same order (what the batched heartbeat binds); kept until
        a host comes up or is terminated, since the fleet heartbeats far more often than it changes."""
        if self._up_json is None:
            self._up_json = json.dumps([host.instance_name for host in self._up.values()])
        return self._up_json

    def billed_hours(self, until: datetime) -> dict[tuple[str, str], float]:
        """(region, instance_type) -> instance-hours from launch to termination (or ``until``)."""
        hours: dict[tuple[str, str], float] = defaultdict(float)
        for host in self.hosts.values():
            end = host.terminated_at or until
            hours[(host.region, host.instance_type)] += max(0.0, (end - host.launched_at).total_seconds()) / 3600
        return dict(hours)
