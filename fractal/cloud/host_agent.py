"""The reference host agent: a small client of the host-service protocol (ARCHITECTURE.md §6).

A real host runs something like this beside its containers; the simulated fleet, the tests and the development
notebook run this one. The protocol, by example::

    agent = HostAgent("http://127.0.0.1:8002", instance_name="i-0abc", host_secret=secret,
                      ip="10.0.0.7", client_commit_hash="abc123", mandelbox_capacity=4)
    agent.handshake()      # POST /host/handshake  -> {"status": "ACTIVE", "heartbeat_interval_s": 10}
    agent.heartbeat()      # POST /host/heartbeat  -> {"status", "heartbeat_interval_s", "stop_mandelboxes": [...]}
    agent.claim(box_id)    # GET /host/mandelboxes/<id>, then PUT {"status": "CONNECTING"}, PUT {"status": "RUNNING"}
    agent.report(box_id, "EXITED")   # PUT /host/mandelboxes/<id> {"status": "EXITED"}: the slot is free at once
    agent.start()          # handshake, then heartbeat every interval (with jitter) in a thread
    agent.stop()

Every call sends ``Authorization: Bearer <host_secret>``. A heartbeat answer's ``stop_mandelboxes`` lists the
mandelboxes whose users deleted them (DYING): the agent stops them and reports EXITED. Status ``DRAINING`` means
take no new work and shut down once empty; ``LOST``/``TERMINATING``/``TERMINATED`` mean stop everything now.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import requests

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
FINAL_STATUSES = frozenset({"LOST", "TERMINATING", "TERMINATED"})


class HostAgentError(Exception):
    """The host API refused a call: ``status`` is the HTTP status, ``code`` the error code of the body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class HttpTransport(Protocol):
    """How the agent talks HTTP: answers (status, parsed JSON body or None)."""

    def send(
        self, method: str, url: str, *, json: Any, headers: Mapping[str, str], timeout: float
    ) -> tuple[int, Any]: ...


class RequestsTransport:
    """Real HTTP through a ``requests.Session`` (connection pooling, thread-safe for our use)."""

    def __init__(self, session: requests.Session | None = None) -> None:
        self.session = session or requests.Session()

    def send(self, method: str, url: str, *, json: Any, headers: Mapping[str, str], timeout: float) -> tuple[int, Any]:
        response = self.session.request(method, url, json=json, headers=dict(headers), timeout=timeout)
        try:
            body = response.json()
        except ValueError:
            body = None
        return response.status_code, body


class WsgiTransport:
    """In-process HTTP through a Flask test client (``app.test_client()``); ``base_url`` is then ignored."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def send(self, method: str, url: str, *, json: Any, headers: Mapping[str, str], timeout: float) -> tuple[int, Any]:
        path = "/" + url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else url
        response = self.client.open(path, method=method, json=json, headers=dict(headers))
        return response.status_code, response.get_json(silent=True)


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat answer."""

    status: str
    heartbeat_interval_s: float
    stop_mandelboxes: list[str]


class HostAgent:
    """A host's side of the protocol: handshake, heartbeats, claiming and reporting mandelboxes, drain."""

    def __init__(
        self,
        base_url: str,
        *,
        instance_name: str,
        host_secret: str,
        ip: str,
        client_commit_hash: str,
        mandelbox_capacity: int,
        http: HttpTransport | None = None,
        interval_s: float | None = None,
        jitter: float = 0.2,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """``interval_s`` overrides the server's heartbeat interval (tests heartbeat at full speed with 0)."""
        self.base_url = base_url.rstrip("/")
        self.instance_name = instance_name
        self.ip = ip
        self.client_commit_hash = client_commit_hash
        self.mandelbox_capacity = mandelbox_capacity
        self.http: HttpTransport = http or RequestsTransport()
        self.interval_override = interval_s
        self.jitter = jitter
        self.timeout_s = timeout_s
        self.status: str | None = None
        self.heartbeat_interval_s: float = 10.0
        self.heartbeats_sent = 0
        self.last_error: Exception | None = None
        self._secret = host_secret
        self._lock = threading.Lock()
        self._mandelboxes: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # never show the secret
        return f"<HostAgent {self.instance_name} {self.status}>"

    # --- protocol calls -----------------------------------------------------------------------------------
    def handshake(self) -> dict[str, Any]:
        """POST /host/handshake: announce ip, version and capacity; a PRE_CONNECTION host becomes ACTIVE."""
        body = self._call(
            "POST",
            "/host/handshake",
            {
                "instance_name": self.instance_name,
                "ip": self.ip,
                "client_commit_hash": self.client_commit_hash,
                "mandelbox_capacity": self.mandelbox_capacity,
            },
        )
        self.status = str(body["status"])
        self.heartbeat_interval_s = float(body["heartbeat_interval_s"])
        return body

    def heartbeat(self, metrics: Mapping[str, Any] | None = None) -> Heartbeat:
        """POST /host/heartbeat with what runs here; stop what the answer says to stop (reporting EXITED)."""
        body = self._call(
            "POST",
            "/host/heartbeat",
            {
                "instance_name": self.instance_name,
                "mandelboxes": [{"mandelbox_id": mid, "status": status} for mid, status in self.mandelboxes().items()],
                "metrics": dict(metrics or {"live_mandelboxes": len(self._mandelboxes)}),
            },
        )
        answer = Heartbeat(
            status=str(body["status"]),
            heartbeat_interval_s=float(body["heartbeat_interval_s"]),
            stop_mandelboxes=[str(mid) for mid in body.get("stop_mandelboxes", [])],
        )
        self.status = answer.status
        self.heartbeat_interval_s = answer.heartbeat_interval_s
        self.heartbeats_sent += 1
        for mandelbox_id in answer.stop_mandelboxes:
            self._stop_mandelbox(mandelbox_id)
        if answer.status in FINAL_STATUSES:
            for mandelbox_id in list(self.mandelboxes()):
                self._forget(mandelbox_id)
        return answer

    def get_mandelbox(self, mandelbox_id: uuid.UUID | str) -> dict[str, Any]:
        """GET /host/mandelboxes/<id>: who a connecting client is (404 unless allocated to this host)."""
        return self._call("GET", f"/host/mandelboxes/{mandelbox_id}", None)

    def claim(self, mandelbox_id: uuid.UUID | str) -> dict[str, Any]:
        """A client connected: check the mandelbox is ours and ALLOCATED, then report CONNECTING and RUNNING."""
        if self.status == "DRAINING" or self.status in FINAL_STATUSES:
            raise HostAgentError(409, "DRAINING", f"This host is {self.status} and takes no new work.")
        found = self.get_mandelbox(mandelbox_id)
        if found["status"] != "ALLOCATED":
            raise HostAgentError(409, "INVALID_TRANSITION", f"The mandelbox is {found['status']}.")
        self.report(mandelbox_id, "CONNECTING")
        return self.report(mandelbox_id, "RUNNING")

    def report(self, mandelbox_id: uuid.UUID | str, status: str) -> dict[str, Any]:
        """PUT /host/mandelboxes/<id> {"status"}: CONNECTING, RUNNING, DYING or EXITED (repeats are no-ops)."""
        body = self._call("PUT", f"/host/mandelboxes/{mandelbox_id}", {"status": status})
        with self._lock:
            if status == "EXITED":
                self._mandelboxes.pop(str(mandelbox_id), None)
            else:
                self._mandelboxes[str(mandelbox_id)] = status
        return body

    def mandelboxes(self) -> dict[str, str]:
        """The mandelboxes this host runs, id → status (a copy)."""
        with self._lock:
            return dict(self._mandelboxes)

    # --- the heartbeat loop -------------------------------------------------------------------------------
    def start(self) -> None:
        """Shake hands (if not done yet), then heartbeat in a daemon thread until stopped, drained or lost."""
        if self._thread is not None and self._thread.is_alive():
            return
        if self.status is None:
            self.handshake()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"host-agent-{self.instance_name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the heartbeat loop and wait for it (bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_stopped(self, timeout: float) -> bool:
        """Wait for the loop to end by itself (drained and empty, or lost); True when it did."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                answer = self.heartbeat()
                failures = 0
            except Exception as exc:  # keep beating through outages, with capped backoff
                self.last_error = exc
                failures += 1
                log.warning("host agent heartbeat failed: %s", type(exc).__name__)
                self._stop.wait(min(30.0, 0.5 * 2**failures))
                continue
            if answer.status in FINAL_STATUSES:
                log.info("host agent stopping: instance is %s", answer.status)
                return
            if answer.status == "DRAINING" and not self.mandelboxes():
                log.info("host agent drained and empty; shutting down")
                return
            self._stop.wait(self._next_wait())

    def _next_wait(self) -> float:
        interval = self.interval_override if self.interval_override is not None else self.heartbeat_interval_s
        # Jitter spreads a fleet's heartbeats so they don't arrive in lockstep after a restart.
        return max(0.0, interval * (1 + random.uniform(-self.jitter, self.jitter)))

    # --- plumbing -----------------------------------------------------------------------------------------
    def _stop_mandelbox(self, mandelbox_id: str) -> None:
        # A real host stops the container here, then reports EXITED. A refusal (already ended elsewhere) is fine.
        try:
            self.report(mandelbox_id, "EXITED")
        except HostAgentError as exc:
            log.info("stop of mandelbox refused: %s", exc.code)
            self._forget(mandelbox_id)

    def _forget(self, mandelbox_id: str) -> None:
        with self._lock:
            self._mandelboxes.pop(mandelbox_id, None)

    def _call(self, method: str, path: str, body: Any) -> dict[str, Any]:
        status, answer = self.http.send(
            method,
            self.base_url + path,
            json=body,
            headers={"Authorization": f"Bearer {self._secret}"},
            timeout=self.timeout_s,
        )
        if status >= 400 or not isinstance(answer, dict):
            answer = answer if isinstance(answer, dict) else {}
            raise HostAgentError(status, str(answer.get("error", "HTTP_ERROR")), str(answer.get("message", "")))
        return answer


__all__ = ["Heartbeat", "HostAgent", "HostAgentError", "HttpTransport", "RequestsTransport", "WsgiTransport"]
