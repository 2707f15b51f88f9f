"""The scaler loop: a pass every ``FRACTAL_SCALER_INTERVAL_S``, sooner when nudged, until told to stop.

Any number of these may run (one per replica): ``reconcile_fleet`` takes the scaler lease, so only one pass runs at
a time and the others skip. The wake-up source is injected: in-process by default, Redis when configured. Every
``FRACTAL_PURGE_INTERVAL_S`` (and on the next pass again while a purge had more left) a pass also purges history
past its retention (``fractal.retention``).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Protocol

import structlog
from sqlalchemy.exc import DBAPIError, OperationalError

from fractal.cloud.base import CloudProvider
from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.metrics import observe_reconcile, record_reconcile_failure, start_metrics_server
from fractal.nudge import LocalNudge, build_nudge
from fractal.observability import redact_text
from fractal.retention import LogObjectStore, default_log_objects
from fractal.scaling.demand import DemandCache
from fractal.scaling.health import record_healthy_pass
from fractal.scaling.reconcile import ReconcileReport, reconcile_fleet

log = structlog.get_logger(__name__)

# Waits are sliced so a stop request is honoured within this long whatever the wake-up source.
STOP_CHECK_S = 0.5


class Wakeup(Protocol):
    """Where early wake-ups come from (``fractal.nudge`` provides a Redis-backed one)."""

    def nudge(self, *_context: object) -> None:
        """Ask for a pass soon; never raises."""

    def wait(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s``; True when nudged."""


def describe_pass_failure(error: BaseException) -> str:
    """The cause of a failed pass in one line, for an operator (no traceback, no credentials)."""
    original = getattr(error, "orig", None)
    text = str(original if original is not None else error).strip().splitlines()
    first = redact_text(text[0] if text else type(error).__name__)[:300]
    pgcode = getattr(original, "pgcode", None)
    if pgcode == "42P01" or "no such table" in first:  # undefined_table (Postgres) / SQLite's wording
        return f"the database is not migrated ({first}); run `./commands migrate` (alembic upgrade head)"
    if isinstance(error, OperationalError) or (isinstance(error, DBAPIError) and error.connection_invalidated):
        return f"the database is unreachable: {first}"
    return f"{type(error).__name__}: {first}"


def build_wakeup(settings: Settings) -> Wakeup:
    """The scaler's wake-up source: the same nudge assign fires (Redis across processes, else in-process)."""
    return build_nudge(settings)


class ScalerLoop:
    """Run passes until stopped. A failing pass is counted, logged once per change of cause (with its stack trace
    then, a short line after that) and retried next interval: the next pass repairs what the failed one left."""

    def __init__(
        self,
        *,
        settings: Settings,
        session_factory: SessionFactory,
        cloud: CloudProvider,
        wakeup: Wakeup | None = None,
        interval_s: float | None = None,
        health_file: Path | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.cloud = cloud
        self.wakeup = wakeup or LocalNudge()
        self.interval_s = settings.scaler_interval_s if interval_s is None else interval_s
        self.health_file = health_file
        self.passes = 0
        self.failures = 0
        self.last_report: ReconcileReport | None = None
        # The cause of the failure streak under way (None while passes succeed) and how long it has lasted.
        self.failure_cause: str | None = None
        self._streak = 0
        self._stop = threading.Event()
        # The first pass that wins the lease purges; then every purge_interval_s (0: never).
        self._next_purge_at = time.monotonic()
        self._log_objects: LogObjectStore | None = default_log_objects(settings)
        # What the demand reads keep from pass to pass (each pass reads what changed).
        self._demand_cache = DemandCache()

    def _purge_due(self) -> bool:
        return self.settings.purge_interval_s > 0 and time.monotonic() >= self._next_purge_at

    def run_once(self) -> ReconcileReport | None:
        """One pass; None when it failed (``failure_cause`` says why)."""
        try:
            report = reconcile_fleet(
                self.session_factory,
                settings=self.settings,
                cloud=self.cloud,
                purge=self._purge_due(),
                log_objects=self._log_objects,
                demand_cache=self._demand_cache,
            )
        except Exception as error:
            self._failed(error)
            return None
        finally:
            self.passes += 1
        if self.failure_cause is not None:
            log.info("scaler.recovered", failed_passes=self._streak, cause=self.failure_cause)
            self.failure_cause, self._streak = None, 0
        if report.purge is not None:
            # Behind (the run stopped at its time bound): go on next pass; caught up: wait the interval.
            wait_s = self.settings.purge_interval_s if report.purge.complete else 0.0
            self._next_purge_at = time.monotonic() + wait_s
        observe_reconcile(report)
        if self.health_file is not None:
            record_healthy_pass(self.health_file)
        self.last_report = report
        return report

    def _failed(self, error: Exception) -> None:
        cause = describe_pass_failure(error)
        self.failures += 1
        record_reconcile_failure()
        if cause != self.failure_cause:
            # A new cause: the whole story once. The same cause again is one short line, not a trace per pass.
            log.error("scaler.pass_failed", cause=cause, exc_info=error)
            self.failure_cause, self._streak = cause, 1
        else:
            self._streak += 1
            log.warning("scaler.pass_failed_again", cause=cause, failed_passes=self._streak)

    def run_forever(self) -> None:
        log.info("scaler.started", interval_s=self.interval_s, cloud=self.cloud.name)
        while not self._stop.is_set():
            self.run_once()
            self._sleep()
        log.info("scaler.stopped", passes=self.passes)

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _sleep(self) -> None:
        deadline = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self.wakeup.wait(min(remaining, STOP_CHECK_S)):
                log.info("scaler.nudged")
                return


def start_scaler_thread(
    settings: Settings,
    session_factory: SessionFactory,
    cloud: CloudProvider,
    *,
    wakeup: Wakeup | None = None,
    interval_s: float | None = None,
) -> Callable[[], None]:
    """Run the loop in a daemon thread (the development server); returns a callable that stops it and waits."""
    loop = ScalerLoop(
        settings=settings, session_factory=session_factory, cloud=cloud, wakeup=wakeup, interval_s=interval_s
    )
    thread = threading.Thread(target=loop.run_forever, name="fractal-scaler", daemon=True)
    thread.start()

    def stop(timeout_s: float = 30.0) -> None:
        loop.stop()
        thread.join(timeout_s)

    return stop


class ScalerPassFailed(RuntimeError):
    """``scaler --once``: the pass failed; the message is its cause in one line."""


def run_scaler(
    settings: Settings,
    session_factory: SessionFactory,
    cloud: CloudProvider,
    *,
    wakeup: Wakeup | None = None,
    once: bool = False,
) -> ReconcileReport | None:
    """The ``scaler`` command: loop in this (main) thread until SIGTERM or SIGINT, finishing the pass under way.

    With ``once``, one pass: its report, or ScalerPassFailed carrying the cause.
    """
    loop = ScalerLoop(
        settings=settings,
        session_factory=session_factory,
        cloud=cloud,
        wakeup=wakeup,
        health_file=None if once else settings.scaler_health_file,
    )
    if once:
        report = loop.run_once()
        if report is None:
            raise ScalerPassFailed(loop.failure_cause or "the pass failed")
        return report
    if settings.scaler_metrics_port is not None:
        # The loop has no web app; Prometheus scrapes this port instead.
        start_metrics_server(settings.scaler_metrics_port)
        log.info("scaler.metrics", port=settings.scaler_metrics_port)

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("scaler.signal", signal=signal.Signals(signum).name)
        loop.stop()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        loop.run_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return loop.last_report
