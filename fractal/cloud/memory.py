"""An in-memory cloud that only records what it was asked: for tests and benchmarks, no hosts ever boot."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from fractal.cloud.base import (
    CloudError,
    CloudHost,
    CloudState,
    HostRef,
    LaunchedHost,
    LaunchRequest,
    enforce_send_deadline,
)


@dataclass
class MemoryCloud:
    """CloudProvider keeping hosts in a dict. ``fail_launches``/``fail_terminates`` inject provider errors;
    ``failing_regions`` (region → error code) makes every call in those regions fail, like an outage there."""

    name: str = "memory"
    hosts: dict[str, CloudHost] = field(default_factory=dict)
    launches: list[LaunchRequest] = field(default_factory=list)
    terminations: list[str] = field(default_factory=list)
    describes: int = 0
    fail_launches: int = 0
    fail_terminates: int = 0
    fail_describes: int = 0
    failing_regions: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def launch(self, request: LaunchRequest) -> LaunchedHost:
        enforce_send_deadline("launch")
        with self._lock:
            self._region_outage(request.region)
            if self.fail_launches > 0:
                self.fail_launches -= 1
                raise CloudError("injected launch failure", code="InsufficientInstanceCapacity", retryable=True)
            self.launches.append(request)
            cloud_id = f"mem-{uuid.uuid4().hex[:12]}"
            self.hosts[cloud_id] = CloudHost(request.instance_name, cloud_id, CloudState.RUNNING)
            return LaunchedHost(request.instance_name, cloud_id)

    def terminate(self, region: str, cloud_provider_ids: Sequence[str]) -> None:
        enforce_send_deadline("terminate")
        with self._lock:
            self._region_outage(region)
            if self.fail_terminates > 0:
                self.fail_terminates -= 1
                raise CloudError("injected terminate failure", code="InternalError", retryable=True)
            for cloud_id in cloud_provider_ids:
                host = self.hosts.get(cloud_id)
                if host is not None:
                    self.hosts[cloud_id] = CloudHost(host.instance_name, cloud_id, CloudState.TERMINATED)
                    self.terminations.append(cloud_id)

    def describe(self, region: str, hosts: Sequence[HostRef]) -> list[CloudHost]:
        with self._lock:
            self.describes += 1
            self._region_outage(region)
            if self.fail_describes > 0:
                self.fail_describes -= 1
                raise CloudError("injected describe failure", code="InternalError", retryable=True)
            ids = {h.cloud_provider_id for h in hosts if h.cloud_provider_id}
            names = {h.instance_name for h in hosts}
            return [h for h in self.hosts.values() if h.cloud_provider_id in ids or h.instance_name in names]

    def _region_outage(self, region: str) -> None:
        code = self.failing_regions.get(region)
        if code is not None:
            raise CloudError(f"injected outage in {region}: {code}", code=code, retryable=True)

    def running(self) -> set[str]:
        """Instance names the cloud is running (not terminated)."""
        with self._lock:
            return {h.instance_name or "" for h in self.hosts.values() if not h.gone}
