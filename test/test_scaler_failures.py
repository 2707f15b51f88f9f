"""Failures stay in their region, region names are checked where they enter, and a failed pass is loud."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fractal.cloud.ec2 import Ec2Cloud
from fractal.cloud.memory import MemoryCloud
from fractal.config import Settings, load_settings
from fractal.database import SessionFactory
from fractal.metrics import PROCESS_METRICS
from fractal.models import Event, Image, Instance, InstanceStatus
from fractal.scaling.health import check_scaler_health
from fractal.scaling.reconcile import reconcile_fleet
from fractal.scaling.runner import ScalerLoop, describe_pass_failure

ROOT = Path(__file__).resolve().parent.parent


def image(region: str, commit: str = "v1", capacity: int = 2) -> Image:
    return Image(
        region=region,
        client_commit_hash=commit,
        ami_id="ami-12345678",
        active=True,
        instance_type="g4dn.xlarge",
        mandelbox_capacity=capacity,
    )


def put(admin: Any, headers: dict[str, str], region: str) -> Any:
    body = {"ami_id": "ami-1", "active": True, "instance_type": "g4dn.xlarge", "mandelbox_capacity": 2}
    return admin.put(f"/admin/images/{region}/v1", json=body, headers=headers)


# --- region names where they enter ---------------------------------------------------------------------------


def test_aws_needs_the_aws_region_form(make_app: Callable[..., Any], admin_headers: dict[str, str]) -> None:
    admin = make_app("admin", cloud="aws").test_client()
    for region in ("0", "us_east_1", "useast1", "-us-east-1", "us-east-1a"):
        answer = put(admin, admin_headers, region)
        assert answer.status_code == 400, (region, answer.json)
        assert answer.json["error"] == "VALIDATION_ERROR" and "region" in answer.json["details"]["path"]
    for region in ("us-east-1", "ap-southeast-2", "us-gov-west-1"):
        assert put(admin, admin_headers, region).status_code == 200, region


def test_an_allow_list_wins_over_the_name_form(make_app: Callable[..., Any], admin_headers: dict[str, str]) -> None:
    admin = make_app("admin", cloud="aws", regions=["lab-1", "us-east-1"]).test_client()
    assert put(admin, admin_headers, "lab-1").status_code == 200
    assert put(admin, admin_headers, "us-east-1").status_code == 200
    refused = put(admin, admin_headers, "eu-west-1")
    assert refused.status_code == 400 and "FRACTAL_REGIONS" in refused.json["details"]["path"]["region"][0]


def test_the_simulated_cloud_takes_any_well_formed_name(
    make_app: Callable[..., Any], admin_headers: dict[str, str]
) -> None:
    admin = make_app("admin").test_client()
    assert put(admin, admin_headers, "lab-0").status_code == 200
    assert put(admin, admin_headers, "Lab").status_code == 400


def test_fractal_regions_is_read_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRACTAL_REGIONS", "us-east-1, eu-west-1,,")
    assert load_settings().regions == ["us-east-1", "eu-west-1"]


# --- failures stay in their region ---------------------------------------------------------------------------


def test_an_invalid_region_row_does_not_stop_the_other_regions_on_ec2(
    moto_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    committed_factory: SessionFactory,
    make_app: Callable[..., Any],
    admin_headers: dict[str, str],
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", moto_endpoint)
    with committed_factory() as session:  # a row written before region names were checked
        session.add_all([image("0"), image("us-east-1")])
        session.commit()
    app = make_app("admin", factory=committed_factory, cloud="aws", target_free_mandelboxes=4)
    admin = app.test_client()
    for _ in range(2):  # the failing region keeps failing; the pass keeps working for the others
        answer = admin.post("/admin/scaling/reconcile", headers=admin_headers)
        assert answer.status_code == 200, answer.json
        (error,) = answer.json["region_errors"]
        assert error["region"] == "0" and error["operation"] == "launch"
        assert error["code"] == "InvalidRegionError"
    with committed_factory() as session:
        rows = session.execute(select(Instance.region, Instance.status, Instance.cloud_provider_id)).all()
        events = session.scalars(select(Event).where(Event.kind == "scaler.error")).all()
    live_east = [r for r in rows if r.region == "us-east-1" and r.status is InstanceStatus.PRE_CONNECTION]
    assert len(live_east) == 2 and all(r.cloud_provider_id.startswith("i-") for r in live_east)
    # Nothing was asked of the cloud in region "0": its rows are finished, not left for every pass to retry.
    assert {r.status for r in rows if r.region == "0"} == {InstanceStatus.TERMINATED}
    assert len(events) == 2 and {e.detail["region"] for e in events} == {"0"}
    # moto keeps one EC2 per test process (other tests' hosts are there too): look ours up by id.
    ec2 = Ec2Cloud(app.extensions["fractal"].settings)._client("us-east-1")
    reservations = ec2.describe_instances(InstanceIds=[r.cloud_provider_id for r in live_east])["Reservations"]
    assert sum(len(r["Instances"]) for r in reservations) == 2


def test_an_outage_in_one_region_skips_it_and_reconciles_the_rest(
    committed_factory: SessionFactory, settings: Settings
) -> None:
    cloud = MemoryCloud(failing_regions={"eu-west-1": "RequestLimitExceeded"})
    scaler = Settings(**{**settings.model_dump(), "target_free_mandelboxes": 4})
    with committed_factory() as session:
        session.add_all([image("eu-west-1"), image("us-east-1"), image("ap-south-1")])
        session.commit()
    report = reconcile_fleet(committed_factory, settings=scaler, cloud=cloud)
    assert report.ran
    assert sorted({r.region for r in cloud.launches}) == ["ap-south-1", "us-east-1"]
    assert len(cloud.launches) == 4
    (error,) = report.region_errors
    assert (error.region, error.operation, error.code) == ("eu-west-1", "launch", "RequestLimitExceeded")
    # Terminations too: TERMINATING rows of the failing region wait for a later pass, the others finish.
    with committed_factory() as session:
        for instance in session.scalars(select(Instance).where(Instance.status == InstanceStatus.PRE_CONNECTION)):
            instance.status = InstanceStatus.TERMINATING
        session.commit()
        session.execute(Image.__table__.update().values(active=False))
        session.commit()
    cloud.failing_regions = {"us-east-1": "Unavailable"}
    report = reconcile_fleet(committed_factory, settings=scaler, cloud=cloud)
    assert [(e.region, e.operation) for e in report.region_errors] == [("us-east-1", "terminate")]
    with committed_factory() as session:
        statuses = {(r, s) for r, s in session.execute(select(Instance.region, Instance.status))}
    assert ("us-east-1", InstanceStatus.TERMINATING) in statuses
    assert ("ap-south-1", InstanceStatus.TERMINATED) in statuses
    assert ("ap-south-1", InstanceStatus.TERMINATING) not in statuses


# --- a failed pass is loud -----------------------------------------------------------------------------------


def _sample(name: str) -> float:
    for collector in PROCESS_METRICS:
        for metric in collector.collect():
            for sample in metric.samples:
                if sample.name == name:
                    return float(sample.value)
    return 0.0


class _Broken:
    """A session factory whose sessions cannot reach any database."""

    def __call__(self) -> Any:
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session

        return Session(create_engine("postgresql+psycopg2://nobody@127.0.0.1:1/none"))


def test_the_loop_counts_failures_logs_each_cause_once_and_recovers(
    committed_factory: SessionFactory, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    health = tmp_path / "scaler.health"
    loop = ScalerLoop(settings=settings, session_factory=_Broken(), cloud=MemoryCloud(), health_file=health)
    failures_before = _sample("fractal_reconcile_failures_total")
    for _ in range(3):
        assert loop.run_once() is None
    assert _sample("fractal_reconcile_failures_total") - failures_before == 3
    assert loop.failure_cause is not None and loop.failure_cause.startswith("the database is unreachable")
    assert check_scaler_health(health, max_age_s=60) is not None  # no pass has succeeded yet
    logged = [r.msg for r in caplog.records if isinstance(r.msg, dict)]  # structlog's event dicts
    failures = [line for line in logged if line["event"].startswith("scaler.pass_failed")]
    assert [line["event"] for line in failures] == ["scaler.pass_failed", *["scaler.pass_failed_again"] * 2]
    assert "exception" in failures[0] and all("exception" not in line for line in failures[1:])

    loop.session_factory = committed_factory
    assert loop.run_once() is not None
    assert loop.failure_cause is None
    assert check_scaler_health(health, max_age_s=60) is None
    assert time.time() - _sample("fractal_reconcile_last_success_timestamp_seconds") < 30
    health.write_text(f"{time.time() - 120}\n")  # as if the last good pass was two minutes ago
    assert "120s ago" in (check_scaler_health(health, max_age_s=60) or "")
    assert "scaler.recovered" in [r.msg["event"] for r in caplog.records if isinstance(r.msg, dict)]


def test_an_unmigrated_database_says_to_migrate() -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    with create_engine("sqlite://").connect() as connection, pytest.raises(OperationalError) as failure:
        connection.execute(text("SELECT * FROM instances"))
    assert "./commands migrate" in describe_pass_failure(failure.value)


def _scaler_once(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FRACTAL_") and k != "DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", str(ROOT / "admin_app.py"), "scaler", "--once"],
        cwd=cwd,
        env={**clean, "FRACTAL_LOG_JSON": "true", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_scaler_once_exits_non_zero_with_the_cause_in_one_line(tmp_path: Path, database_url: str) -> None:
    unmigrated = _scaler_once(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path / 'empty.db'}")
    assert unmigrated.returncode != 0
    assert json.loads(unmigrated.stdout.strip().splitlines()[-1])["ran"] is False
    last = unmigrated.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: scaler pass failed: the database is not migrated") and "./commands migrate" in last

    unreachable = _scaler_once(tmp_path, DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    assert unreachable.returncode != 0
    assert "the database is unreachable" in unreachable.stderr.strip().splitlines()[-1]

    ok = _scaler_once(tmp_path, DATABASE_URL=database_url, FRACTAL_ENV="test")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout.strip().splitlines()[-1])["ran"] is True


def _healthcheck(health_file: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FRACTAL_")}
    return subprocess.run(
        [sys.executable, str(ROOT / "env.py"), "healthcheck"],
        # As in the image: PROMETHEUS_MULTIPROC_DIR names a directory a fresh tmpfs /tmp does not have.
        env={
            **clean,
            "FRACTAL_APP": "scaler",
            "FRACTAL_SCALER_HEALTH_FILE": str(health_file),
            "PROMETHEUS_MULTIPROC_DIR": str(health_file.parent / "missing-prometheus"),
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_scaler_healthcheck_fails_when_no_pass_succeeded_lately(tmp_path: Path) -> None:
    health = tmp_path / "scaler.health"
    missing = _healthcheck(health)
    assert missing.returncode == 1 and "no scaler pass has completed yet" in missing.stderr
    health.write_text(f"{time.time()}\n")
    assert _healthcheck(health).returncode == 0
    # Four intervals of the default 15 s, at least a minute: two minutes without a good pass is unhealthy.
    health.write_text(f"{time.time() - 120}\n")
    stale = _healthcheck(health)
    assert stale.returncode == 1 and "last successful scaler pass was" in stale.stderr
