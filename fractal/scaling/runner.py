"""The scaler loop: a pass every ``FRACTAL_SCALER_INTERVAL_S``, sooner when nudged, until told to stop.

Any number of these may run (one per replica): ``reconcile_fleet`` takes a Postgres advisory lock, so only one pass
runs at a time and the others skip. The wake-up source is injected: in-process by default, Redis when configured.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Protocol

import structlog

from fractal.cloud.base import CloudProvider
from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.metrics import observe_reconcile, start_metrics_server
from fractal.nudge import LocalNudge, build_nudge
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


def build_wakeup(settings: Settings) -> Wakeup:
    """The scaler's wake-up source: the same nudge assign fires (Redis across processes, else in-process)."""
    return build_nudge(settings)


class ScalerLoop:
    """Run passes until stopped. A failing pass is logged and retried next interval (the next pass repairs)."""

    def __init__(
        self,
        *,
        settings: Settings,
        session_factory: SessionFactory,
        cloud: CloudProvider,
        wakeup: Wakeup | None = None,
        interval_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.cloud = cloud
        self.wakeup = wakeup or LocalNudge()
        self.interval_s = settings.scaler_interval_s if interval_s is None else interval_s
        self.passes = 0
        self.last_report: ReconcileReport | None = None
        self._stop = threading.Event()

    def run_once(self) -> ReconcileReport | None:
        try:
            report = reconcile_fleet(self.session_factory, settings=self.settings, cloud=self.cloud)
        except Exception:
            log.exception("scaler.pass_failed")
            return None
        finally:
            self.passes += 1
        observe_reconcile(report)
        self.last_report = report
        return report

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


def run_scaler(
    settings: Settings,
    session_factory: SessionFactory,
    cloud: CloudProvider,
    *,
    wakeup: Wakeup | None = None,
    once: bool = False,
) -> ReconcileReport | None:
    """The ``scaler`` command: loop in this (main) thread until SIGTERM or SIGINT, finishing the pass under way."""
    loop = ScalerLoop(settings=settings, session_factory=session_factory, cloud=cloud, wakeup=wakeup)
    if once:
        return loop.run_once()
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
