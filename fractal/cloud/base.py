"""What the scaler needs from a cloud: launch one host, terminate hosts, describe hosts. Nothing else."""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# Tags every launched host carries; describe finds hosts by the instance-name tag when the provider id is unknown
# (a launch whose answer was lost, a host registered by hand).
TAG_INSTANCE_NAME = "fractal:instance-name"
TAG_REGION = "fractal:region"
TAG_CLIENT_COMMIT_HASH = "fractal:client-commit-hash"
TAG_MANAGED_BY = "fractal:managed-by"
MANAGED_BY = "fractal-scaler"


class CloudState(enum.StrEnum):
    """Normalised lifecycle of a cloud host (EC2's names)."""

    PENDING = "pending"
    RUNNING = "running"
    SHUTTING_DOWN = "shutting-down"
    STOPPING = "stopping"
    STOPPED = "stopped"
    TERMINATED = "terminated"


@dataclass(frozen=True)
class LaunchRequest:
    """One host to start. ``instance_name`` doubles as the launch's idempotency token."""

    instance_name: str
    region: str
    client_commit_hash: str
    ami_id: str
    instance_type: str
    mandelbox_capacity: int
    host_secret: str
    host_api_url: str

    def __repr__(self) -> str:  # never print the secret
        return f"LaunchRequest({self.instance_name!r}, {self.region!r}, {self.ami_id!r}, {self.instance_type!r})"


@dataclass(frozen=True)
class LaunchedHost:
    instance_name: str
    cloud_provider_id: str


@dataclass(frozen=True)
class HostRef:
    """A host as the database knows it: its name, and its provider id when recorded."""

    instance_name: str
    cloud_provider_id: str | None


@dataclass(frozen=True)
class CloudHost:
    """A host as the cloud reports it."""

    instance_name: str | None
    cloud_provider_id: str
    state: CloudState

    @property
    def gone(self) -> bool:
        return self.state is CloudState.TERMINATED


class CloudError(Exception):
    """A cloud call failed (after any retries). ``code`` is the provider's error code when known;
    ``maybe_done`` is True when the request may still have taken effect (a timeout, a lost connection)."""

    def __init__(
        self, message: str, *, code: str | None = None, retryable: bool = False, maybe_done: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.maybe_done = maybe_done


class DeadlinePassed(CloudError):
    """A launch or terminate was not sent: the caller's deadline (``send_deadline``) had passed. Nothing happened."""


# The instant (time.monotonic()) after which this thread's launch and terminate requests are refused unsent.
_SEND_DEADLINE: ContextVar[float | None] = ContextVar("fractal_cloud_send_deadline", default=None)


@contextmanager
def send_deadline(deadline: float | None) -> Iterator[None]:
    """Within the block, a launch or terminate request that would leave after ``deadline`` (time.monotonic()) is
    refused at the last moment before it is sent (DeadlinePassed), however long the caller was stalled (a
    SIGSTOP, a long GC pause, a slow client set-up) between deciding to send it and sending it.

    The scaler passes the end of its lease: a leader paused past its lease does not act when it wakes."""
    token = _SEND_DEADLINE.set(deadline)
    try:
        yield
    finally:
        _SEND_DEADLINE.reset(token)


def enforce_send_deadline(operation: str) -> None:
    """Call as late as possible before a launch or terminate request leaves: raises DeadlinePassed past it."""
    deadline = _SEND_DEADLINE.get()
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlinePassed(f"{operation} not sent: its deadline had passed", code="DeadlinePassed")


@runtime_checkable
class CloudProvider(Protocol):
    """A fleet backend. Implementations are thread-safe and connect lazily (never at construction)."""

    name: str

    def launch(self, request: LaunchRequest) -> LaunchedHost:
        """Start one host; idempotent per ``request.instance_name``. Raises CloudError."""
        ...

    def terminate(self, region: str, cloud_provider_ids: Sequence[str]) -> None:
        """Ask the cloud to terminate these hosts (idempotent). Raises CloudError."""
        ...

    def describe(self, region: str, hosts: Sequence[HostRef]) -> list[CloudHost]:
        """Every cloud host matching ``hosts`` (by provider id, else by name tag); absent ones are gone."""
        ...
