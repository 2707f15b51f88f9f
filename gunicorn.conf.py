"""Gunicorn settings for every Fractal API, all from the environment (env.py execs gunicorn with this file).

GUNICORN_BIND (default 0.0.0.0:8000, or 0.0.0.0:$PORT), GUNICORN_WORKERS (default 2 x CPUs + 1, capped at 8),
GUNICORN_THREADS (default 4), GUNICORN_WORKER_CLASS (default gthread), GUNICORN_TIMEOUT (30),
GUNICORN_GRACEFUL_TIMEOUT (30), GUNICORN_KEEPALIVE (5), GUNICORN_MAX_REQUESTS (0: never recycle),
GUNICORN_CONTROL_SOCKET (unset: no control socket), FRACTAL_LOG_LEVEL, FRACTAL_LOG_JSON (gunicorn's own lines as
JSON, like the app's).

Prometheus multiprocess mode: every worker writes its counters and histograms to files under
PROMETHEUS_MULTIPROC_DIR (created here when unset, wiped at start so a restart never reports stale counts), and any
worker's /metrics aggregates them. A dead worker's live gauges are dropped in child_exit.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import tempfile
from typing import Any

from gunicorn import glogging


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _default_workers() -> int:
    return min(2 * multiprocessing.cpu_count() + 1, 8)


bind = os.environ.get("GUNICORN_BIND") or f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = _int("GUNICORN_WORKERS", _default_workers())
threads = _int("GUNICORN_THREADS", 4)
# Chosen by measurement on 2 cores (docs/benchmarks.md, "Worker model"); GUNICORN_WORKER_CLASS=sync for one
# request per worker process at a time (then GUNICORN_THREADS is ignored).
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "").strip() or "gthread"
timeout = _int("GUNICORN_TIMEOUT", 30)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 30)
keepalive = _int("GUNICORN_KEEPALIVE", 5)
max_requests = _int("GUNICORN_MAX_REQUESTS", 0)
max_requests_jitter = max_requests // 10
# Heartbeat files in memory: a container's overlay filesystem can stall workers (gunicorn's own advice).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108
loglevel = os.environ.get("FRACTAL_LOG_LEVEL", "info").lower()
errorlog = "-"
accesslog = None  # the app logs one JSON line per request with its request id; no second, unstructured line


class ErrorLogOnly(glogging.Logger):
    """gunicorn's logger, writing its access line only when an access log is configured (``--access-logfile``).

    gunicorn counts any ``logconfig_dict`` (ours below: its own lines as JSON) as access logging switched on, and
    so built every request's Apache-style atoms (a dict of every environ entry and every request and response
    header) and a log record that no handler writes: a tenth of a /healthz request's worker CPU under load, more
    for the apps' larger environ than for a bare Flask app (py-spy samples of a served worker).
    """

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        if self.cfg.accesslog:
            super().access(resp, req, environ, request_time)


logger_class = ErrorLogOnly
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
proc_name = "fractal-" + os.environ.get("FRACTAL_APP", "api")
# gunicorn 27's control socket defaults to one path per user: several masters on a host would share it.
control_socket = os.environ.get("GUNICORN_CONTROL_SOCKET") or None
control_socket_disable = control_socket is None


def _json_logging() -> dict[str, Any]:
    """gunicorn's own lines (boot, worker exits) as JSON too, through the app's structlog renderer."""
    import structlog

    formatter = {
        "()": structlog.stdlib.ProcessorFormatter,
        "processor": structlog.processors.JSONRenderer(),
        "foreign_pre_chain": [
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
    }
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": formatter},
        "handlers": {"console": handler},
        "loggers": {"gunicorn.error": {"level": loglevel.upper(), "handlers": ["console"], "propagate": False}},
    }


if os.environ.get("FRACTAL_LOG_JSON", "true").strip().lower() not in ("0", "false", "no", "off"):
    logconfig_dict = _json_logging()

# Must be in the environment before the workers import prometheus_client (they import the app after forking).
_OWN_MULTIPROC_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _OWN_MULTIPROC_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fractal-prometheus-")
PROMETHEUS_MULTIPROC_DIR = os.environ["PROMETHEUS_MULTIPROC_DIR"]


def on_starting(server: Any) -> None:
    """Start from empty metric files: counts from a previous master would otherwise be added in."""
    os.makedirs(PROMETHEUS_MULTIPROC_DIR, exist_ok=True)
    for entry in os.listdir(PROMETHEUS_MULTIPROC_DIR):
        path = os.path.join(PROMETHEUS_MULTIPROC_DIR, entry)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    server.log.info("prometheus multiprocess dir %s", PROMETHEUS_MULTIPROC_DIR)


def when_ready(server: Any) -> None:
    """FRACTAL_METRICS_PORT: every worker's metrics, served by the master on a port of its own (not the API's),
    so the public and host APIs' counters reach Prometheus without being on the internet-facing port."""
    port = os.environ.get("FRACTAL_METRICS_PORT", "").strip()  # Settings.metrics_port; the master loads no app
    if port:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        start_http_server(int(port), addr="0.0.0.0", registry=registry)  # noqa: S104 (inside a container)
        server.log.info("metrics of every worker on port %s", port)


def post_fork(server: Any, worker: Any) -> None:
    """Every worker answers gunicorn-level refusals (414, 431, a bad Content-Length) in Fractal's JSON shape."""
    from fractal.gunicorn_errors import install

    install(server, worker)


def post_worker_init(worker: Any) -> None:
    """Keep the loaded app out of the garbage collector's full passes (``gc.freeze``).

    A worker holds ~140,000 tracked objects once the app is imported (a bare Flask app ~50,000), none of them
    garbage; every full collection walked all of them: 0.3 s per pass on a loaded 2-core machine, ~15-30 us per
    /healthz request on average in-process, and a latency spike for whichever requests it landed on. Frozen
    objects are never collected: what import-time garbage there is goes first (``gc.collect``).
    """
    gc.collect()
    gc.freeze()


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges from the aggregate."""
    from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics

    GunicornPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)


def on_exit(server: Any) -> None:
    """Remove the metrics directory this config created (an operator-provided one is left alone)."""
    if _OWN_MULTIPROC_DIR:
        shutil.rmtree(PROMETHEUS_MULTIPROC_DIR, ignore_errors=True)
