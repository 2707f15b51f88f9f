"""deploy/: the Prometheus alert rules (promtool checks them and runs their unit tests on recorded series), the
scrape config and its compose service, and the Grafana dashboard. Every metric they name is one the apps export.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from apiflask import APIFlask
from prometheus_client.parser import text_string_to_metric_families

from fractal.auth.dev_keys import ensure_dev_keypair, mint_token
from fractal.config import DEV_PRIVATE_KEY_PATH, DEV_PUBLIC_KEY_PATH
from fractal.metrics import PROCESS_METRICS
from test.factories import Factories
from test.processes import Stack, http_get
from test.test_fleet_page import Admin
from test.test_packaging import template_config

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "fractal-fleet.json"
# What the issue asks alerts for, by the rule that covers it.
REQUIRED_ALERTS = {
    "FractalScalerNoSuccessfulPass",  # no successful scaler pass for 5 minutes
    "FractalNoInstanceAvailableRising",  # a rising NO_INSTANCE_AVAILABLE rate
    "FractalFreeCapacityBelowTarget",  # free capacity below target for 10 minutes
    "FractalHostsLost",  # lost hosts
    "FractalHigh5xxRate",  # 5xx rate
    "FractalDatabaseNotReady",  # database not ready
    "FractalRedisNotReady",  # Redis not ready
}
METRIC = re.compile(r"\b((?:fractal|flask)_[a-zA-Z0-9_]+)\b")
PROMETHEUS_OWN = {"up"}  # set by Prometheus for every target


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: ./commands test installs Debian's prometheus package")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


@pytest.fixture
def exported(make_app: Callable[..., APIFlask], factories: Factories) -> Iterator[set[str]]:
    """Every sample name the apps export: the admin API's /metrics (with a fleet to report on, one request seen)
    plus the process metrics every role registers (the scaler's port serves those)."""
    factories.image()
    factories.instance()
    client = make_app("admin").test_client()
    client.get("/healthz")
    text = client.get("/metrics").get_data(as_text=True)
    names: set[str] = set()
    families = list(text_string_to_metric_families(text))
    for collector in PROCESS_METRICS:
        families += [family for family in collector.collect()]
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"]}
    for family in families:
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, []))
        names.update(sample.name for sample in family.samples)
    yield names


def test_promtool_checks_the_rules_and_the_scrape_config() -> None:
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "alerts.yml" in config.stdout + config.stderr


def test_promtool_unit_tests_pass_on_recorded_series() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The recorded series do decide: with the free-capacity alert's 10 minutes made 20, its test fails."""
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path)
    text = (PROMETHEUS / "alerts.yml").read_text()
    assert text.count("        for: 10m\n") == 2  # the free-capacity and the stuck-LOST rules
    (tmp_path / "alerts.yml").write_text(text.replace("        for: 10m\n", "        for: 20m\n"))
    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "FractalFreeCapacityBelowTarget" in result.stdout + result.stderr


def test_every_required_alert_is_there_and_tested() -> None:
    names = {rule["alert"] for rule in rules()}
    assert names >= REQUIRED_ALERTS
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    firing = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")}
    quiet = {case["alertname"] for test in tests for case in test["alert_rule_test"] if not case.get("exp_alerts")}
    assert firing == names, names - firing  # every rule is seen firing ...
    assert quiet == names, names - quiet  # ... and seen quiet
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alerts_and_dashboard_name_only_exported_metrics(exported: set[str]) -> None:
    for expr in [rule["expr"] for rule in rules()] + dashboard_exprs():
        used = set(METRIC.findall(expr))
        unknown = used - exported
        assert not unknown, f"{expr!r} names metrics nobody exports: {unknown}"
        selected = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))  # every name with a selector
        assert selected <= exported | PROMETHEUS_OWN, f"{expr!r}: {selected - exported - PROMETHEUS_OWN}"


def test_the_dashboard_shows_what_the_alerts_watch() -> None:
    alerted = {name for rule in rules() for name in METRIC.findall(rule["expr"])}
    shown = {name for expr in dashboard_exprs() for name in METRIC.findall(expr)}
    assert alerted <= shown, alerted - shown


def test_the_dashboard_is_grafana_json_with_valid_promql(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
    # Every query is valid PromQL: promtool parses them as recording rules (variables replaced by what "All" is).
    exprs = dashboard_exprs()
    for expr in exprs:
        for variable in re.findall(r"\$(\w+)", expr):
            assert variable in variables, variable
    records = [{"record": f"dashboard:query_{n}", "expr": re.sub(r"\$\w+", ".*", expr)} for n, expr in enumerate(exprs)]
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": records}]}))
    result = promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_prometheus_on_this_config_and_scrapes_every_role() -> None:
    out = template_config("--format", "json")
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    prometheus = services["prometheus"]
    mounts = {volume["target"]: volume for volume in prometheus["volumes"]}
    assert Path(mounts["/etc/prometheus"]["source"]) == PROMETHEUS and mounts["/etc/prometheus"]["read_only"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert prometheus["ports"][0]["host_ip"] == "127.0.0.1"  # no authentication: loopback only
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: target for job in config["scrape_configs"] for target in job["static_configs"][0]["targets"]
    }
    # Each target is a compose service on the port that serves its metrics there.
    ports = {
        "fractal-admin": ("admin", "8000"),
        "fractal-scaler": ("scaler", services["scaler"]["environment"]["FRACTAL_SCALER_METRICS_PORT"]),
        "fractal-public": ("public", services["public"]["environment"]["FRACTAL_METRICS_PORT"]),
        "fractal-host": ("host", services["host"]["environment"]["FRACTAL_METRICS_PORT"]),
    }
    assert targets == {job: f"{service}:{port}" for job, (service, port) in ports.items()}
    assert re.search(r"GUNICORN_BIND=\S+:8000\b", (ROOT / "Dockerfile").read_text())  # the APIs' port inside
    jobs = {rule_job for rule in rules() for rule_job in re.findall(r'job=~"([^"]+)"', rule["expr"])}
    assert all(re.fullmatch(pattern, job) for pattern in jobs for job in targets)


def test_the_running_stack_exports_every_metric_the_rules_use(three_shells: Stack) -> None:
    """Under gunicorn (multiprocess metrics) too: the admin API's /metrics and the public API's metrics port."""
    keys = ensure_dev_keypair(ROOT / DEV_PRIVATE_KEY_PATH, ROOT / DEV_PUBLIC_KEY_PATH)
    admin = Admin(three_shells, mint_token(keys.private_pem, user_id="monitoring-test", admin=True))
    suffix = uuid.uuid4().hex[:6]
    region, commit = f"mon-{suffix}-1", f"mon{suffix}"
    image = {"ami_id": "ami-mon", "active": True, "instance_type": "local.sim", "mandelbox_capacity": 2}
    assert admin.call("PUT", f"/admin/images/{region}/{commit}", json=image).status_code in (200, 201)
    admin.register(f"mon-host-{suffix}", region, commit, capacity=2, handshake=True)
    scraped: set[str] = set()
    for url in (three_shells.admin.url + "/metrics", f"http://127.0.0.1:{three_shells.public_metrics_port}/metrics"):
        status, body = http_get(url)
        assert status == 200, url
        for family in text_string_to_metric_families(body.decode()):
            scraped.update(sample.name for sample in family.samples)
    used = {name for rule in rules() for name in METRIC.findall(rule["expr"])}
    assert used - scraped == set()
    assert (
        f'fractal_target_free_mandelboxes{{client_commit_hash="{commit}",region="{region}"}}'
        in http_get(three_shells.admin.url + "/metrics")[1].decode()
    )
