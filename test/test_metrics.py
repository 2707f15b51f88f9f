"""Metrics: requests by route rule and status, assignments by result, fleet gauges, scaler metrics.

The admin API serves /metrics with the fleet gauges; the public and host APIs, which face the internet, serve none
on their port (gunicorn serves their workers' counters on FRACTAL_METRICS_PORT, tested in test_start_sequence.py).
The request-level tests below use one app serving the public and admin blueprints, so its /metrics shows both.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from apiflask import APIFlask
from prometheus_client.parser import text_string_to_metric_families

from fractal.blueprints import ADMIN_BLUEPRINTS, BLUEPRINTS_BY_API
from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.factory import create_app
from fractal.metrics import record_reconcile, start_metrics_server
from fractal.models import InstanceStatus
from test.factories import Factories
from test.processes import free_port, http_get

Headers = Callable[..., dict[str, str]]
COUNT = "flask_http_request_duration_seconds_count"  # requests by method, status and route rule


def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_admin_api_serves_metrics_with_the_fleet_gauges(make_app: Callable[..., APIFlask]) -> None:
    client = make_app("admin").test_client()
    client.get("/healthz")
    samples = scrape(client)
    assert value(samples, COUNT, method="GET", status="200", url_rule="/healthz") == 1
    assert value(samples, "fractal_fleet_metrics_up") == 1


@pytest.mark.parametrize("kind", ["public", "host"])
def test_internet_facing_apps_serve_no_metrics_on_their_port(make_app: Callable[..., APIFlask], kind: str) -> None:
    answer = make_app(kind).test_client().get("/metrics")
    assert answer.status_code == 404 and answer.json["error"] == "NOT_FOUND"


@pytest.fixture
def public_client(settings: Settings, session_factory: SessionFactory) -> Any:
    """Public routes in an app that also serves the operators' /metrics (see the module docstring)."""
    blueprints = [*BLUEPRINTS_BY_API["public"], *BLUEPRINTS_BY_API["admin"]]
    return create_app(blueprints=blueprints, settings=settings, session_factory=session_factory).test_client()


def test_requests_are_labelled_by_route_rule_not_raw_path(public_client: Any, user_headers: Headers) -> None:
    for _ in range(3):
        public_client.get(f"/mandelbox/{uuid.uuid4()}", headers=user_headers())
    samples = scrape(public_client)
    rule = "/mandelbox/<mandelbox_id>"
    assert value(samples, COUNT, method="GET", status="404", url_rule=rule) == 3
    assert not any("url_rule" in dict(labels) and "-" in dict(labels)["url_rule"] for _, labels in samples)


def test_assignments_are_counted_by_result(public_client: Any, factories: Factories, user_headers: Headers) -> None:
    factories.image()
    factories.instance(mandelbox_capacity=1)
    before = scrape(public_client)
    body = {"regions": ["us-east-1"], "client_commit_hash": "abc123"}
    assert public_client.post("/mandelbox/assign", json=body, headers=user_headers("m1")).status_code == 201
    assert public_client.post("/mandelbox/assign", json=body, headers=user_headers("m1")).status_code == 409
    assert public_client.post("/mandelbox/assign", json=body, headers=user_headers("m2")).status_code == 503
    after = scrape(public_client)

    def delta(result: str) -> float:
        name = "fractal_assignments_total"
        return value(after, name, result=result) - value(before, name, result=result)

    assert delta("ALLOCATED") == 1
    assert delta("USER_ALREADY_ACTIVE") == 1
    assert delta("NO_INSTANCE_AVAILABLE") == 1


def test_fleet_gauges_read_capacity_and_hosts_from_the_database(admin_client: Any, factories: Factories) -> None:
    factories.instance(region="us-east-1", client_commit_hash="v1", mandelbox_capacity=4, live_mandelboxes=1)
    factories.instance(region="us-east-1", client_commit_hash="v1", mandelbox_capacity=4, live_mandelboxes=4)
    factories.instance(region="us-east-1", client_commit_hash="v2", mandelbox_capacity=2)
    factories.instance(region="eu-west-1", client_commit_hash="v1", status=InstanceStatus.DRAINING, live_mandelboxes=1)
    factories.instance(region="eu-west-1", client_commit_hash="v1", status=InstanceStatus.TERMINATED)
    samples = scrape(admin_client)
    east_v1 = {"region": "us-east-1", "client_commit_hash": "v1"}
    assert value(samples, "fractal_mandelbox_capacity", **east_v1) == 8
    assert value(samples, "fractal_mandelboxes_used", **east_v1) == 5
    assert value(samples, "fractal_free_mandelboxes", **east_v1) == 3
    assert value(samples, "fractal_free_mandelboxes", region="us-east-1", client_commit_hash="v2") == 2
    # DRAINING capacity is not free capacity.
    assert ("fractal_free_mandelboxes", (("client_commit_hash", "v1"), ("region", "eu-west-1"))) not in samples
    assert value(samples, "fractal_hosts", region="us-east-1", status="ACTIVE") == 3
    assert value(samples, "fractal_hosts", region="eu-west-1", status="DRAINING") == 1
    assert ("fractal_hosts", (("region", "eu-west-1"), ("status", "TERMINATED"))) not in samples


def test_reconcile_metrics_are_exported(admin_client: Any) -> None:
    before = scrape(admin_client)
    record_reconcile(0.1, {})
    record_reconcile(0.25, {"launch": 2, "drain": 0, "terminate": 1})
    after = scrape(admin_client)
    count = "fractal_reconcile_duration_seconds_count"
    assert value(after, count) - value(before, count) == 2
    launches = "fractal_reconcile_actions_total"
    assert value(after, launches, action="launch") - value(before, launches, action="launch") == 2
    assert value(after, launches, action="terminate") - value(before, launches, action="terminate") == 1
    assert ("fractal_reconcile_actions_total", (("action", "drain"),)) not in after or value(
        after, launches, action="drain"
    ) == value(before, launches, action="drain")


def test_metrics_survive_a_database_outage(settings: Settings) -> None:
    down = Settings(**{**settings.model_dump(), "database_url": "postgresql://nobody:pw@127.0.0.1:1/none"})
    client = create_app(blueprints=ADMIN_BLUEPRINTS, settings=down).test_client()
    samples = scrape(client)
    assert value(samples, "fractal_fleet_metrics_up") == 0


def test_the_scaler_process_can_serve_its_metrics_without_a_web_app() -> None:
    port = free_port()
    server = start_metrics_server(port, addr="127.0.0.1")
    try:
        record_reconcile(0.5, {"launch": 1})
        status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200
    assert b"fractal_reconcile_duration_seconds_count" in body
    assert b'fractal_reconcile_actions_total{action="launch"}' in body


def test_a_reconcile_pass_through_the_admin_api_is_counted(
    make_app: Callable[..., Any], admin_headers: dict[str, str], factories: Any
) -> None:
    from fractal.cloud.memory import MemoryCloud

    app = make_app("admin", target_free_mandelboxes=8)
    app.extensions["fractal"].cloud = MemoryCloud()
    client = app.test_client()
    factories.image(mandelbox_capacity=4)  # no instances yet: the pass launches two
    before = scrape(client)
    response = client.post("/admin/scaling/reconcile", headers=admin_headers)
    assert response.status_code == 200
    launched = [a for a in response.json["actions"] if a["action"] == "launch"]
    assert len(launched) == 2
    after = scrape(client)
    name = "fractal_reconcile_actions_total"
    before_launches = value(before, name, action="launch") if (name, (("action", "launch"),)) in before else 0
    assert value(after, name, action="launch") - before_launches == 2
    count = "fractal_reconcile_duration_seconds_count"
    assert value(after, count) - value(before, count) == 1


def test_the_target_free_gauge_follows_active_images(make_app: Callable[..., APIFlask], factories: Factories) -> None:
    factories.image(region="us-east-1", client_commit_hash="t1", target_free=3)
    factories.image(region="us-east-1", client_commit_hash="t2")  # no override: the setting
    factories.image(region="eu-west-1", client_commit_hash="t3", active=False, target_free=9)
    samples = scrape(make_app("admin", target_free_mandelboxes=5).test_client())
    target = "fractal_target_free_mandelboxes"
    assert value(samples, target, region="us-east-1", client_commit_hash="t1") == 3
    assert value(samples, target, region="us-east-1", client_commit_hash="t2") == 5
    assert (target, (("client_commit_hash", "t3"), ("region", "eu-west-1"))) not in samples


def test_dependency_readiness_is_exported(make_app: Callable[..., APIFlask], settings: Settings) -> None:
    import os

    redis_url = os.environ.get("FRACTAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    samples = scrape(make_app("admin", redis_url=redis_url).test_client())
    assert value(samples, "fractal_dependency_ready", dependency="database") == 1
    assert value(samples, "fractal_dependency_ready", dependency="redis") == 1
    # Nothing listens on port 1: both are reported down, and the scrape still answers.
    down = Settings(
        **{
            **settings.model_dump(),
            "database_url": "postgresql://nobody:pw@127.0.0.1:1/none",
            "redis_url": "redis://127.0.0.1:1/0",
        }
    )
    samples = scrape(create_app(blueprints=ADMIN_BLUEPRINTS, settings=down).test_client())
    assert value(samples, "fractal_dependency_ready", dependency="database") == 0
    assert ("fractal_dependency_ready", (("dependency", "redis"),)) in samples
    assert value(samples, "fractal_dependency_ready", dependency="redis") == 0


def test_the_series_alerts_rate_exist_at_zero_before_anything_happens(admin_client: Any) -> None:
    samples = scrape(admin_client)
    assert ("fractal_assignments_total", (("result", "NO_INSTANCE_AVAILABLE"),)) in samples
    assert ("fractal_reconcile_actions_total", (("action", "lost"),)) in samples


_EQUAL_TO_THE_PUBLIC_API = r"""
import json, os, sys, types
from prometheus_client import CollectorRegistry, Counter, Histogram
from fractal import metrics

multiprocess = metrics.multiprocess_mode()
fast = CollectorRegistry()
request_metrics = metrics.RequestMetrics(fast)
public = CollectorRegistry()
duration = Histogram("public_duration_seconds", "d", ("method", "url_rule", "status"), registry=public)
total = Counter("public_total", "t", ("method", "status"), registry=public)
# Every bucket's bound exactly, either side of each, zero, and past the last finite bound.
bounds = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
durations = [0.0, 1e-9, 99.0] + [b + d for b in bounds for d in (-1e-9, 0.0, 1e-9)]
now = [0.0]
metrics.default_timer = lambda: now[0]
for n, seconds in enumerate(durations):
    status = 200 if n % 3 else 404
    rule = types.SimpleNamespace(rule="/healthz") if n % 5 else None
    current = types.SimpleNamespace(method="GET", url_rule=rule, path="/healthz", environ={})
    request_metrics.start(current, 0.0)  # started at 0.0, so the duration is exactly ``seconds``
    now[0] = seconds
    request_metrics.finish(current, status)
    duration.labels("GET", rule.rule if rule else "None", status).observe(seconds)
    total.labels("GET", status).inc()


def samples(registry, prefix):
    if multiprocess:
        from prometheus_client.multiprocess import MultiProcessCollector
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    out = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.startswith(prefix) and not sample.name.endswith("_created"):
                name = sample.name[len(prefix):]
                out[name + json.dumps(sorted(sample.labels.items()))] = sample.value
    return out


print(json.dumps([multiprocess, samples(fast, "flask_http_request_"), samples(public, "public_")]))
"""


@pytest.mark.parametrize("multiprocess", [False, True], ids=["single-process", "multiprocess"])
def test_request_metrics_equal_the_public_api(multiprocess: bool, tmp_path: Any) -> None:
    """RequestMetrics writes the histogram's and counter's values directly (fractal.metrics._observation): the
    samples are those Histogram.observe and Counter.inc give for the same requests, bucket bounds included, in
    both of prometheus_client's modes (chosen at its import, so each in a process of its own)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}
    if multiprocess:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", _EQUAL_TO_THE_PUBLIC_API], env=env, capture_output=True, text=True, check=True
    )
    mode, fast, public = json.loads(done.stdout.splitlines()[-1])
    assert mode is multiprocess
    assert {k: v for k, v in fast.items() if k.startswith(("duration_seconds", "total"))} == public
    assert any(k.startswith("duration_seconds_bucket") and v > 0 for k, v in public.items())


def test_request_metrics_fall_back_to_the_public_api_for_children_laid_out_otherwise() -> None:
    """A child without the attributes _observation reads (another prometheus_client layout) is written through
    its public observe and inc."""
    from bisect import bisect_left

    from fractal.metrics import _observation

    seen: list[tuple[str, float]] = []

    class Child:
        def observe(self, amount: float) -> None:
            seen.append(("observe", amount))

        def inc(self, amount: float = 1) -> None:
            seen.append(("inc", amount))

    add_to_sum, bounds, add_to_bucket, add_to_total = _observation(Child(), Child())
    add_to_sum(0.25)
    add_to_bucket[bisect_left(bounds, 0.25)](1)
    add_to_total(1)
    assert seen == [("observe", 0.25), ("inc", 1)]
