"""Prometheus metrics: HTTP requests per route rule, assignments, fleet capacity, scaler passes.

Metric names (the contract for dashboards and alerts):

- ``flask_http_request_duration_seconds{method,status,url_rule}`` (its ``_count`` is requests by route rule and
  status): every request, labelled by route *rule* (``/mandelbox/<mandelbox_id>``), never by raw path;
  ``flask_http_request_total{method,status}`` is the exporter's overall counter.
- ``fractal_assignments_total{result}``: assign attempts by outcome; ``result`` is ``ALLOCATED`` or the
  refusal's error code (``NO_INSTANCE_AVAILABLE``, ``USER_ALREADY_ACTIVE``, ...).
- ``fractal_mandelbox_capacity{region,client_commit_hash}``, ``fractal_mandelboxes_used{...}`` and
  ``fractal_free_mandelboxes{...}``: over ACTIVE instances, read from the database at scrape time.
- ``fractal_target_free_mandelboxes{region,client_commit_hash}``: the free slots the scaler keeps for each active
  image, as its next pass would decide (``policy.decide_target``: its ``target_free``, else
  ``FRACTAL_TARGET_FREE_MANDELBOXES``, or what its demand-aware ``buffer_policy`` gives); compare with
  ``fractal_free_mandelboxes``.
- ``fractal_hosts{region,status}``: instances by status (TERMINATED excluded: it only grows).
- ``fractal_fleet_metrics_up``: 1 when the fleet gauges could be read from the database.
- ``fractal_dependency_ready{dependency}``: 1 when ``database`` / ``redis`` answers the admin API's readiness
  check at scrape time, else 0 (what ``/readyz`` reports; Redis has no series when it is not configured).
- ``fractal_target_free_reason{region,client_commit_hash,reason}``: 1 for why each active image has the target it
  has (``static``, ``demand``, ``floor``, ``ceiling``, ``schedule``; see the image's ``buffer_policy``).
- ``fractal_reconcile_duration_seconds`` (histogram) and ``fractal_reconcile_actions_total{action}``: one
  observation per scaler pass and one count per action it took (``launch``, ``drain``, ``terminate``, ...).
- ``fractal_reconcile_failures_total``: passes that failed as a whole (the database, a bug);
  ``fractal_reconcile_last_success_timestamp_seconds``: when a pass last completed (alert on its age);
  ``fractal_reconcile_region_errors_total{region,operation}``: cloud calls that failed in one region, which that
  pass then skipped while it reconciled the others.
- ``fractal_purged_rows_total{kind}``: history rows the scaler's purge deleted past their retention (``events``,
  ``mandelboxes``, ``log_uploads``, ``heartbeats``, ``instances``, ``idempotency_keys``).

The alert rules and the Grafana dashboard in ``deploy/`` use these names only (``test/test_deploy_monitoring.py``).

Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` switches the counters and histograms to multiprocess files so any
worker's ``/metrics`` answers for all of them (gunicorn.conf.py sets this up). The fleet gauges are computed by
whichever worker serves the scrape, with three cheap queries (two GROUP BYs and the active images).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from timeit import default_timer
from typing import Any, TypeVar, cast
from wsgiref.simple_server import WSGIServer

from apiflask import APIFlask
from flask import Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_flask_exporter import PrometheusMetrics
from sqlalchemy import func, select

from fractal.database import SessionFactory
from fractal.errors import ErrorCode, FractalError
from fractal.models import Instance, InstanceStatus

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

METRICS_PATH = "/metrics"
ASSIGNED = "ALLOCATED"

# Created unregistered: each app registers them in its own registry (several apps may live in one test process).
ASSIGNMENTS = Counter(
    "fractal_assignments_total",
    "Mandelbox assign attempts by result: ALLOCATED or the refusal's error code.",
    ["result"],
    registry=None,
)
RECONCILE_DURATION = Histogram(
    "fractal_reconcile_duration_seconds",
    "Wall-clock time of one scaler reconcile pass.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=None,
)
RECONCILE_ACTIONS = Counter(
    "fractal_reconcile_actions_total",
    "Actions taken by scaler reconcile passes, by kind (launch, drain, terminate, mark_lost, release, ...).",
    ["action"],
    registry=None,
)
RECONCILE_FAILURES = Counter(
    "fractal_reconcile_failures_total",
    "Scaler passes that failed as a whole (database trouble, an unmigrated schema, a bug).",
    registry=None,
)
RECONCILE_LAST_SUCCESS = Gauge(
    "fractal_reconcile_last_success_timestamp_seconds",
    "Unix time at which a scaler pass last completed (alert when it grows old).",
    registry=None,
    multiprocess_mode="max",
)
RECONCILE_REGION_ERRORS = Counter(
    "fractal_reconcile_region_errors_total",
    "Cloud calls that failed in one region during a pass; that region was skipped, the others reconciled.",
    ["region", "operation"],
    registry=None,
)
PURGED_ROWS = Counter(
    "fractal_purged_rows_total",
    "History rows deleted by the scaler's purge once past their retention, by kind.",
    ["kind"],
    registry=None,
)
# Series that alerts take the rate of exist from the start at 0, so the first refusal or lost host is an increase
# (a counter series that appears already at 1 shows none to rate() and increase()).
for _result in (ASSIGNED, str(ErrorCode.NO_INSTANCE_AVAILABLE)):
    ASSIGNMENTS.labels(result=_result)
for _action in ("launch", "drain", "terminate", "lost"):
    RECONCILE_ACTIONS.labels(action=_action)

PROCESS_METRICS: tuple[Collector, ...] = (
    ASSIGNMENTS,
    RECONCILE_DURATION,
    RECONCILE_ACTIONS,
    RECONCILE_FAILURES,
    RECONCILE_LAST_SUCCESS,
    RECONCILE_REGION_ERRORS,
    PURGED_ROWS,
)


def record_assignment(result: str) -> None:
    """Count one assign attempt (``ALLOCATED`` or an error code)."""
    ASSIGNMENTS.labels(result=result).inc()


def count_assignments(view: F) -> F:
    """Wrap the assign view: count its outcome by result without touching the (flask-free) service."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            response = view(*args, **kwargs)
        except FractalError as refusal:
            record_assignment(str(refusal.code))
            raise
        record_assignment(ASSIGNED)
        return response

    return cast(F, wrapper)


def observe_reconcile(report: Any) -> None:
    """Record one scaler pass (a ReconcileReport) that completed; a skipped pass (lock held elsewhere) counts as
    a success of this process: another replica is doing the work."""
    RECONCILE_LAST_SUCCESS.set(time.time())
    if getattr(report, "ran", False):
        counts: dict[str, int] = {}
        for action in report.actions:
            counts[action.action] = counts.get(action.action, 0) + 1
        record_reconcile(report.duration_s, counts)
        for error in getattr(report, "region_errors", ()):
            RECONCILE_REGION_ERRORS.labels(region=error.region, operation=error.operation).inc()
        purge = getattr(report, "purge", None)
        if purge is not None:
            record_purge(purge.purged)


def record_purge(purged: dict[str, int]) -> None:
    """Count the rows one purge run deleted, per kind."""
    for kind, count in purged.items():
        if count:
            PURGED_ROWS.labels(kind=kind).inc(count)


def record_reconcile_failure() -> None:
    """Count one scaler pass that failed as a whole."""
    RECONCILE_FAILURES.inc()


def record_reconcile(duration_s: float, actions: dict[str, int]) -> None:
    """Record one scaler pass: its duration and how many actions of each kind it took."""
    RECONCILE_DURATION.observe(duration_s)
    for action, count in actions.items():
        if count:
            RECONCILE_ACTIONS.labels(action=action).inc(count)


class FleetCollector(Collector):
    """Capacity and hosts-by-status gauges, read from the database when Prometheus scrapes."""

    def __init__(self, session_factory: Callable[[], SessionFactory], *, default_target_free: int = 0) -> None:
        self._session_factory = session_factory
        self._default_target_free = default_target_free

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["region", "client_commit_hash"]
        capacity = GaugeMetricFamily(
            "fractal_mandelbox_capacity", "Mandelbox slots on ACTIVE instances.", labels=labels
        )
        used = GaugeMetricFamily("fractal_mandelboxes_used", "Live mandelboxes on ACTIVE instances.", labels=labels)
        free = GaugeMetricFamily("fractal_free_mandelboxes", "Free slots on ACTIVE instances.", labels=labels)
        hosts = GaugeMetricFamily(
            "fractal_hosts", "Instances by status (TERMINATED excluded).", labels=["region", "status"]
        )
        target = GaugeMetricFamily(
            "fractal_target_free_mandelboxes",
            "Free slots the scaler keeps for each active image: the target its buffer policy gives now.",
            labels=labels,
        )
        up = GaugeMetricFamily("fractal_fleet_metrics_up", "1 when the fleet gauges could be read from the database.")
        reason = GaugeMetricFamily(
            "fractal_target_free_reason",
            "1 for why each active image has its free-slot target (static, demand, floor, ceiling, schedule).",
            labels=[*labels, "reason"],
        )
        decisions: dict[tuple[str, str], Any] = {}
        try:
            with self._session_factory()() as session:
                per_version = session.execute(
                    select(
                        Instance.region,
                        Instance.client_commit_hash,
                        func.sum(Instance.mandelbox_capacity),
                        func.sum(Instance.live_mandelboxes),
                    )
                    .where(Instance.status == InstanceStatus.ACTIVE)
                    .group_by(Instance.region, Instance.client_commit_hash)
                ).all()
                per_status = session.execute(
                    select(Instance.region, Instance.status, func.count())
                    .where(Instance.status != InstanceStatus.TERMINATED)
                    .group_by(Instance.region, Instance.status)
                ).all()
                from fractal.scaling.capacity import image_targets  # the scaler's own decision (no cycle)

                decisions = image_targets(session, default_target_free=self._default_target_free)
        except Exception as exc:  # a scrape must never fail because the database is down; say so in a gauge
            log.warning("fleet metrics unavailable: database query failed (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        for region, commit, total, live in per_version:
            capacity.add_metric([region, commit], int(total or 0))
            used.add_metric([region, commit], int(live or 0))
            free.add_metric([region, commit], int((total or 0) - (live or 0)))
        for region, status, count in per_status:
            hosts.add_metric([region, str(status)], count)
        for (region, commit), decision in sorted(decisions.items()):
            target.add_metric([region, commit], decision.target)
            reason.add_metric([region, commit, decision.reason], 1)
        up.add_metric([], 1)
        yield from (capacity, used, free, target, reason, hosts, up)


class ReadinessCollector(Collector):
    """``fractal_dependency_ready{dependency}``: the readiness check (``/readyz``'s) run when Prometheus scrapes.

    ``check`` answers ``{"database": "ok" | "unavailable", "redis": "ok" | "unavailable" | "not configured"}``;
    a dependency that is not configured has no series.
    """

    def __init__(self, check: Callable[[], Mapping[str, str]]) -> None:
        self._check = check

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ready = GaugeMetricFamily(
            "fractal_dependency_ready",
            "1 when the dependency answered the readiness check at scrape time, else 0.",
            labels=["dependency"],
        )
        for dependency, result in self._check().items():
            if result != "not configured":
                ready.add_metric([dependency], 1 if result == "ok" else 0)
        yield ready


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> WSGIServer:  # noqa: S104 (inside a container)
    """Serve this process's metrics on ``port`` from a daemon thread (the scaler loop has no web app).

    Returns the server; ``shutdown()`` stops it.
    """
    registry = CollectorRegistry()
    if multiprocess_mode():
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        for collector in PROCESS_METRICS:
            registry.register(collector)
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server


def multiprocess_mode() -> bool:
    """True under gunicorn with PROMETHEUS_MULTIPROC_DIR set (metrics shared through files)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


_STARTED = "fractal.metrics_started"
_REPORTED = "fractal.metrics_reported"


class RequestMetrics:
    """Every request except /metrics, as prometheus-flask-exporter's default metrics (same names, labels and
    buckets): ``flask_http_request_duration_seconds{method,url_rule,status}``, ``flask_http_request_total
    {method,status}``, and ``flask_http_request_exceptions_total{method,status}`` for an exception no handler
    answered (then status 500).

    Called from the request pipeline's own hooks (``observability.register_request_context``: one before, one
    after and one teardown hook for the request id, the access line and these), not hooks of its own: each hook
    Flask dispatches costs a lookup of the request and a call on every request. The exporter looked the labelled
    children up (``labels(**...)``, validation and a lock) twice per request; here each label combination is
    looked up once per process and kept.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._duration = Histogram(
            "flask_http_request_duration_seconds",
            "Flask HTTP request duration in seconds",
            ("method", "url_rule", "status"),
            registry=registry,
        )
        self._total = Counter(
            "flask_http_request_total", "Total number of HTTP requests", ("method", "status"), registry=registry
        )
        self._exceptions = Counter(
            "flask_http_request_exceptions_total",
            "Total number of HTTP requests which resulted in an exception",
            ("method", "status"),
            registry=registry,
        )
        self._children: dict[tuple[str, str, int], _Observation] = {}

    def start(self, current: Request, started: float) -> None:
        """The request began at ``started`` (``timeit.default_timer``); /metrics itself is not counted."""
        if not current.path.startswith(METRICS_PATH):  # as the exporter's excluded_paths pattern matched
            current.environ[_STARTED] = started

    def finish(self, current: Request, status: int) -> None:
        """Count the answer (once per request, whichever of finish and failed comes first)."""
        environ = current.environ
        started = environ.get(_STARTED)
        if started is None or _REPORTED in environ:
            return
        environ[_REPORTED] = True
        rule = current.url_rule
        # The rule's text, as the exporter's str(rule) gave it; "None" when nothing matched (a 404 or 405).
        key = (current.method, rule.rule if rule is not None else "None", status)
        observation = self._children.get(key)
        if observation is None:
            observation = _observation(
                self._duration.labels(key[0], key[1], status), self._total.labels(key[0], status)
            )
            self._children[key] = observation
        add_to_sum, bounds, add_to_bucket, add_to_total = observation
        duration = max(default_timer() - started, 0.0)
        add_to_sum(duration)
        add_to_bucket[bisect_left(bounds, duration)](1)
        add_to_total(1)

    def failed(self, current: Request) -> None:
        """An exception no handler answered ended the request: a 500."""
        if current.environ.get(_STARTED) is None:
            return
        self._exceptions.labels(current.method, 500).inc()
        self.finish(current, 500)


# A label combination's writers: the histogram's sum, its upper bounds, one writer per bucket, the total counter.
_Observation = tuple[Callable[[float], None], tuple[float, ...], list[Callable[[float], None]], Callable[[float], None]]


def _observation(duration: Any, total: Any) -> _Observation:
    """The writers ``Histogram.observe`` and ``Counter.inc`` end in, taken from the children once.

    Per request, ``observe`` and ``inc`` each check that the child is observable (twice for the histogram) and
    the histogram walks its buckets in Python before they write the same values; that layer was a third of the
    request metrics' cost (``/healthz`` in-process). Writing the values directly, with the bucket found by
    bisection (the first bound >= the duration, as ``observe``'s walk picks; the last bound is +Inf), gives the
    same samples in single-process and multiprocess mode (``test_request_metrics_equal_the_public_api``). Should
    a prometheus_client release lay its children out differently, the public calls are used instead.
    """
    try:
        bounds = tuple(float(bound) for bound in duration._upper_bounds)
        buckets = [bucket.inc for bucket in duration._buckets]
        add_to_sum = duration._sum.inc
        add_to_total = total._value.inc
        well_formed = len(bounds) == len(buckets) and bounds[-1] == float("inf")
    except (AttributeError, TypeError, IndexError):
        well_formed = False
    if not well_formed:
        return (duration.observe, (float("inf"),), [lambda _one: None], total.inc)
    return (add_to_sum, bounds, buckets, add_to_total)


def register_metrics(
    app: APIFlask,
    *,
    operator_facing: bool,
    readiness: Callable[[], Mapping[str, str]] | None = None,
    default_target_free: int = 0,
) -> RequestMetrics:
    """Request metrics by route rule and the process metrics; the operators' app also serves them on /metrics.

    Returns the request metrics, for the request pipeline's hooks to call (``register_request_context``).

    The public and host APIs face the internet: their port serves no /metrics (free capacity and error counts
    are not for everyone) and they run no fleet query. Their counters still reach Prometheus through
    ``FRACTAL_METRICS_PORT`` (gunicorn.conf.py serves every worker's there, off the public port). The admin API,
    which only operators reach, serves /metrics with the fleet gauges and, given ``readiness``, the dependencies'
    readiness.
    """
    registry = CollectorRegistry()
    exporter = PrometheusMetrics(
        app,
        path=None,  # served below, so the fleet collector joins the multiprocess output too
        registry=registry,
        export_defaults=False,  # the request metrics are recorded by RequestMetrics, same names
    )
    exporter.info("flask_exporter_info", "Information about the Prometheus Flask exporter", version=exporter.version)
    request_metrics = RequestMetrics(registry)
    if not multiprocess_mode():
        for collector in PROCESS_METRICS:
            registry.register(collector)
    if not operator_facing:
        return request_metrics
    fleet = FleetCollector(
        lambda: cast(SessionFactory, app.extensions["fractal"].session_factory),
        default_target_free=default_target_free,
    )
    live: list[Collector] = [fleet, *([ReadinessCollector(readiness)] if readiness is not None else [])]
    if not multiprocess_mode():
        for collector in live:
            registry.register(collector)

    @app.get(METRICS_PATH)
    @app.doc(hide=True)  # Prometheus text format, not part of the JSON API
    def serve_metrics() -> Response:
        scrape = registry
        if multiprocess_mode():
            # Counters and histograms of every worker (ours and the exporter's) live in files; gauges are live.
            scrape = CollectorRegistry()
            MultiProcessCollector(scrape)  # type: ignore[no-untyped-call]
            for collector in live:
                scrape.register(collector)
        return Response(generate_latest(scrape), mimetype=CONTENT_TYPE_LATEST)

    return request_metrics
