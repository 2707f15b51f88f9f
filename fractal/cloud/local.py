"""A simulated fleet: each launched host is a thread running the reference host agent over real HTTP."""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from fractal.cloud.base import CloudHost, CloudState, HostRef, LaunchedHost, LaunchRequest, enforce_send_deadline
from fractal.config import Settings

if TYPE_CHECKING:
    from fractal.cloud.host_agent import HostAgent

log = structlog.get_logger(__name__)

HANDSHAKE_RETRY_S = 1.0


@dataclass
class SimulatedHost:
    """One simulated machine: boots after a delay, shakes hands (retrying), then heartbeats until stopped."""

    request: LaunchRequest
    cloud_provider_id: str
    ip: str
    boot_delay_s: float
    state: CloudState = CloudState.PENDING
    stopped: threading.Event = field(default_factory=threading.Event)
    agent: HostAgent | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"sim-host-{self.request.instance_name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from fractal.cloud.host_agent import HostAgent

        if self.stopped.wait(self.boot_delay_s):
            return
        self.state = CloudState.RUNNING
        agent = HostAgent(
            self.request.host_api_url,
            instance_name=self.request.instance_name,
            host_secret=self.request.host_secret,
            ip=self.ip,
            client_commit_hash=self.request.client_commit_hash,
            mandelbox_capacity=self.request.mandelbox_capacity,
        )
        # The host API may not be up yet (the dev server starts everything at once): keep knocking.
        while not self.stopped.is_set():
            try:
                agent.handshake()
                break
            except Exception as error:  # any failure: retry until terminated
                log.info("simulated_host.handshake_retry", instance_name=self.request.instance_name, error=str(error))
                self.stopped.wait(HANDSHAKE_RETRY_S)
        if self.stopped.is_set():
            return
        self.agent = agent
        agent.start()
        log.info("simulated_host.up", instance_name=self.request.instance_name)
        # A real host powers off when its agent ends by itself (drained and empty, or told it is lost/terminated);
        # EC2 then reports it terminated. Mirror that so describe tells the scaler the same story.
        while not self.stopped.is_set():
            if agent.wait_stopped(0.5):
                self.state = CloudState.TERMINATED
                return

    def stop(self) -> None:
        self.stopped.set()
        if self.agent is not None:
            self.agent.stop(timeout=2.0)
        self.state = CloudState.TERMINATED


class LocalCloud:
    """CloudProvider for development and tests: hosts live as threads in this process."""

    name = "local"

    def __init__(self, settings: Settings, *, boot_delay_s: float | None = None) -> None:
        self._settings = settings
        self._boot_delay_s = settings.local_boot_delay_s if boot_delay_s is None else boot_delay_s
        self._hosts: dict[str, SimulatedHost] = {}
        self._by_name: dict[str, str] = {}
        self._lock = threading.Lock()
        self._ips = itertools.count(1)

    def launch(self, request: LaunchRequest) -> LaunchedHost:
        enforce_send_deadline("launch")
        with self._lock:
            existing = self._by_name.get(request.instance_name)
            if existing is not None:  # idempotent per instance name, like EC2's ClientToken
                return LaunchedHost(request.instance_name, existing)
            cloud_id = f"local-{uuid.uuid4().hex[:12]}"
            n = next(self._ips)
            host = SimulatedHost(
                request=request,
                cloud_provider_id=cloud_id,
                ip=f"127.0.{(n // 250) % 250}.{n % 250 + 1}",
                boot_delay_s=self._boot_delay_s,
            )
            self._hosts[cloud_id] = host
            self._by_name[request.instance_name] = cloud_id
        host.start()
        return LaunchedHost(request.instance_name, cloud_id)

    def terminate(self, region: str, cloud_provider_ids: Sequence[str]) -> None:
        enforce_send_deadline("terminate")
        for cloud_id in cloud_provider_ids:
            with self._lock:
                host = self._hosts.get(cloud_id)
            if host is not None:
                host.stop()

    def describe(self, region: str, hosts: Sequence[HostRef]) -> list[CloudHost]:
        with self._lock:
            ids = {h.cloud_provider_id for h in hosts if h.cloud_provider_id in self._hosts}
            ids |= {self._by_name[h.instance_name] for h in hosts if h.instance_name in self._by_name}
            return [CloudHost(self._hosts[i].request.instance_name, i, self._hosts[i].state) for i in sorted(ids)]

    def agent(self, instance_name: str) -> HostAgent | None:
        """The running agent of a simulated host (tests and demos use it to claim mandelboxes)."""
        with self._lock:
            cloud_id = self._by_name.get(instance_name)
            host = self._hosts.get(cloud_id) if cloud_id else None
        return host.agent if host is not None else None

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop every simulated host (process exit, end of a test)."""
        with self._lock:
            hosts = list(self._hosts.values())
        for host in hosts:
            host.stop()
        for host in hosts:
            if host.thread is not None:
                host.thread.join(timeout=timeout_s)
