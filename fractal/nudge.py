"""Waking the scaler early: assign nudges when it had to refuse for lack of room, the scaler waits on it.

With ``REDIS_URL`` a nudge is one element on a Redis list (LPUSH, trimmed to one so nudges coalesce) and a
waiter BLPOPs it, so a nudge from any API replica wakes one scaler process, and a nudge sent while no scaler
is waiting is kept until the next wait. On a Redis Cluster the nudge is one key, so its pipeline and BLPOP run
on the one master that owns its slot. Without Redis (or while it is down) an in-process event does the same
for a scaler running in the same process. Nudging never raises and never blocks a request for long.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Protocol

import structlog

from fractal.config import Settings
from fractal.redis_client import REDIS_ERRORS, connect

log = structlog.get_logger(__name__)

NUDGE_KEY = "scaler:nudge"
# A pending nudge older than this is pointless: the scaler has run a regular pass since.
NUDGE_TTL_S = 300
# Waits are cut into BLPOPs of at most this long so that a dead connection is noticed within bounded time.
MAX_BLOCK_S = 5.0


class Nudge(Protocol):
    def nudge(self, *_context: object) -> None:
        """Ask the scaler to run a pass soon (fire and forget; never raises)."""

    def wait(self, timeout_s: float) -> bool:
        """Block until nudged or ``timeout_s`` passed; True when nudged."""


class LocalNudge:
    """In-process nudges: a threading.Event."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def nudge(self, *_context: object) -> None:
        self._event.set()

    def wait(self, timeout_s: float) -> bool:
        nudged = self._event.wait(max(0.0, timeout_s))
        if nudged:
            self._event.clear()
        return nudged


_PROCESS_NUDGE = LocalNudge()


class RedisNudge:
    """Nudges through a Redis list, shared by every process on one Redis; falls back to in-process."""

    def __init__(self, url: str, *, key: str) -> None:
        self.key = key
        # Nudges go through a fast-failing client; waits through one whose read timeout exceeds a BLPOP chunk.
        self._sender = connect(url)
        self._waiter = connect(url, socket_timeout=MAX_BLOCK_S + 2)
        self._local = LocalNudge()

    def nudge(self, *_context: object) -> None:
        self._local.nudge()
        try:
            pipe = self._sender.pipeline(transaction=True)
            pipe.lpush(self.key, "1")
            pipe.ltrim(self.key, 0, 0)
            pipe.expire(self.key, NUDGE_TTL_S)
            pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning("scaler_nudge_failed", error_type=type(exc).__name__)

    def wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            # A nudge from this very process counts too (e.g. the scaler runs beside the API in development).
            if self._local.wait(0):
                self._drain()
                return True
            remaining = deadline - time.monotonic()
            try:
                if remaining < 0.01:  # BLPOP with timeout 0 would block forever
                    return self._sender.lpop(self.key) is not None
                if self._waiter.blpop([self.key], timeout=min(remaining, MAX_BLOCK_S)) is not None:
                    self._local.wait(0)
                    return True
            except REDIS_ERRORS as exc:
                log.warning("scaler_nudge_wait_failed", error_type=type(exc).__name__)
                return self._local.wait(deadline - time.monotonic())

    def _drain(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            self._sender.delete(self.key)


def build_nudge(settings: Settings) -> LocalNudge | RedisNudge:
    """A Redis-backed nudge when ``REDIS_URL`` is set, else an in-process one. Connects on first use."""
    if settings.redis_url:
        return RedisNudge(settings.redis_url, key=f"{settings.redis_prefix}{NUDGE_KEY}")
    # Without Redis a nudge can only reach this process: every app and the scaler loop in it share one.
    return _PROCESS_NUDGE
