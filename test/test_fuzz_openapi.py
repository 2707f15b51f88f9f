"""Schemathesis against each app's own /openapi.json: no 5xx, and every answer is documented and matches its schema.

Each app is fuzzed in-process through its WSGI callable (schemathesis' ``from_wsgi``) on the test's savepoint
sessions, with valid credentials (a user token on the public API, an admin token on the admin API, a host secret
on the host API) and a seeded world (images, instances, a live mandelbox) so that path parameters sometimes name
real rows and requests get past authentication to the interesting code.

Each app is fuzzed a second time with ``FRACTAL_CLOUD=aws`` (the real boto3 EC2 provider, talking to a moto server on
loopback): the scaler's reconcile endpoint then launches and terminates moto instances, and every app builds its
settings and cloud the way production does. Fewer examples there (FRACTAL_FUZZ_AWS_EXAMPLES, default 8): the
routes are the same, what differs is the cloud behind them.

Not fuzzed: the raw-body log-upload routes (``PUT /host/mandelboxes/{id}/logs``, ``PUT /mandelbox/{id}/logs``) —
their body is an opaque byte stream with no requestBody in the spec; test/test_log_uploads.py covers them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
import schemathesis
from apiflask import APIFlask
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fractal.assignment.service import assign_mandelbox
from fractal.cloud.ec2 import Ec2Cloud
from fractal.cloud.memory import MemoryCloud
from fractal.database import SessionFactory
from fractal.models import InstanceStatus
from test.factories import Factories
from test.servers import SmtpServer

pytestmark = pytest.mark.slow

# Examples per operation and generation mode: small enough that the three apps together stay well under a minute.
# FRACTAL_FUZZ_EXAMPLES raises it for a longer hunt; FRACTAL_FUZZ_RANDOM=1 draws new examples on every run.
MAX_EXAMPLES = int(os.environ.get("FRACTAL_FUZZ_EXAMPLES", "25"))
AWS_MAX_EXAMPLES = int(os.environ.get("FRACTAL_FUZZ_AWS_EXAMPLES", "8"))
RAW_BODY_ROUTES = {"/host/mandelboxes/{mandelbox_id}/logs", "/mandelbox/{mandelbox_id}/logs"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
NEGATIVE_CHECKS = [*CHECKS, negative_data_rejection]
REJECTIONS = ["400", "401", "403", "404", "405", "409", "413", "415", "422", "429"]


@dataclass
class World:
    """Seeded rows whose names the fuzzer substitutes into path parameters half of the time."""

    user_id: str
    mandelbox_id: str
    instance_name: str
    host_secret: str
    region: str = "us-east-1"
    client_commit_hash: str = "abc123"


@pytest.fixture
def settings_overrides(smtp_server: SmtpServer) -> dict[str, Any]:
    # Mail goes to a loopback SMTP sink; limits high enough that the fuzzer explores instead of hitting 429.
    return {
        "smtp_url": smtp_server.url,
        "newsletter_rate_limit": "100000 per minute",
        "handshake_failure_rate_limit": "100000 per minute",
        "max_mandelboxes_per_user": 1000,
    }


@pytest.fixture
def world(factories: Factories, session_factory: SessionFactory) -> World:
    factories.image()
    factories.image(region="eu-west-1", client_commit_hash="def456", active=False)
    instance, secret = factories.instance(mandelbox_capacity=100)
    factories.instance(status=InstanceStatus.DRAINING)
    factories.instance(status=InstanceStatus.PRE_CONNECTION, ip=None)
    with session_factory() as session:
        result = assign_mandelbox(
            session, user_id="fuzz-user", regions=["us-east-1"], client_commit_hash="abc123", max_per_user=1000
        )
        mandelbox_id = str(result.assignment.mandelbox_id)
    return World("fuzz-user", mandelbox_id, instance.instance_name, secret)


def _substitute(world: World, counter: Iterator[int]) -> Callable[[Any], None]:
    """Every other case, replace generated path parameters and top-level body fields by seeded values."""
    known: dict[str, Any] = {
        "mandelbox_id": world.mandelbox_id,
        "instance_name": world.instance_name,
        "region": world.region,
        "regions": [world.region],
        "client_commit_hash": world.client_commit_hash,
        "ip": "10.1.2.3",
        "email": "fuzz@example.com",
        "to": "fuzz@example.com",
        "template": "welcome",
        "args": {"name": "Fuzz"},
    }

    def negated(case: Any, location: ParameterLocation) -> bool:
        component = case.meta.components.get(location) if case.meta is not None else None
        return component is not None and component.mode.is_negative

    def apply(case: Any) -> None:
        # Never overwrite the part a negative case made invalid: that would turn it into a valid request.
        if next(counter) % 2:
            return
        if not negated(case, ParameterLocation.PATH):
            for name in case.path_parameters or {}:
                if name in known:
                    case.path_parameters[name] = known[name]
        if isinstance(case.body, dict) and not negated(case, ParameterLocation.BODY):
            for name in case.body:
                if name in known:
                    case.body[name] = known[name]

    return apply


@dataclass
class FuzzReport:
    failures: list[str]
    succeeded: set[str]  # "METHOD /path" of operations that answered 2xx at least once


def fuzz(app: APIFlask, headers: dict[str, str], world: World, *, max_examples: int = MAX_EXAMPLES) -> FuzzReport:
    """Run every operation in positive and negative mode, collecting failures instead of stopping at the first."""
    # Credentials are supplied (valid) by the test; the fuzzer must not also generate or strip Authorization.
    # Refusing an oversized body with 413 is a rejection too.
    config = SchemathesisConfig.from_dict(
        {
            "generation": {"with-security-parameters": False},
            "checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}},
        }
    )
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app, config=config)
    report = FuzzReport(failures=[], succeeded=set())
    substitute = _substitute(world, itertools.count())
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in RAW_BODY_ROUTES:
            continue
        operations += 1
        for mode, checks in ((GenerationMode.POSITIVE, CHECKS), (GenerationMode.NEGATIVE, NEGATIVE_CHECKS)):
            try:
                _fuzz_operation(operation, mode, checks, headers, substitute, report.succeeded, max_examples)
            except Unsatisfiable:
                continue  # nothing to negate (no parameters, no body)
            except (Exception, FailureGroup) as failure:
                label = f"{operation.method.upper()} {operation.path} [{mode.value}]"
                report.failures.append(f"{label}: {str(failure)[:3000]}")
    assert operations > 0
    return report


def _fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    checks: list[Any],
    headers: dict[str, str],
    substitute: Callable[[Any], None],
    succeeded: set[str],
    max_examples: int,
) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=not os.environ.get("FRACTAL_FUZZ_RANDOM"),
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report the first failure as found
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        substitute(case)
        response = case.call_and_validate(headers=headers, checks=checks)
        if response.status_code < 300:
            succeeded.add(f"{operation.method.upper()} {operation.path}")

    run()


@pytest.fixture
def fuzz_app(make_app: Callable[..., APIFlask], aws_env: str) -> Callable[[str], APIFlask]:
    def build(kind: str) -> APIFlask:
        app = make_app(kind)
        # The scaler's reconcile endpoint launches nothing real: an in-memory cloud records what it was asked.
        app.extensions["fractal"].cloud = MemoryCloud()
        return app

    return build


def test_public_api_conforms_to_its_spec(
    fuzz_app: Callable[[str], APIFlask], world: World, user_headers: Callable[..., dict[str, str]]
) -> None:
    report = fuzz(fuzz_app("public"), user_headers(world.user_id), world)
    assert not report.failures, "\n\n".join(report.failures)
    # The seeded world was reached: these succeeded at least once (not only 4xx were explored).
    assert {
        "POST /mandelbox/assign",
        "GET /mandelbox/{mandelbox_id}",
        "DELETE /mandelbox/{mandelbox_id}",
        "POST /newsletter/subscribe",
    } <= report.succeeded


def test_admin_api_conforms_to_its_spec(
    fuzz_app: Callable[[str], APIFlask], world: World, admin_headers: dict[str, str]
) -> None:
    report = fuzz(fuzz_app("admin"), admin_headers, world)
    assert not report.failures, "\n\n".join(report.failures)
    assert {
        "PUT /admin/images/{region}/{client_commit_hash}",
        "POST /admin/instances",
        "POST /admin/instances/{instance_name}/drain",
        "GET /admin/mandelboxes/{mandelbox_id}/logs",
        "POST /admin/scaling/reconcile",
        "POST /admin/mail",
    } <= report.succeeded


def test_host_api_conforms_to_its_spec(fuzz_app: Callable[[str], APIFlask], world: World) -> None:
    report = fuzz(fuzz_app("host"), {"Authorization": f"Bearer {world.host_secret}"}, world)
    assert not report.failures, "\n\n".join(report.failures)
    assert {
        "POST /host/handshake",
        "POST /host/heartbeat",
        "GET /host/mandelboxes/{mandelbox_id}",
        "PUT /host/mandelboxes/{mandelbox_id}",
    } <= report.succeeded


@pytest.fixture
def aws_fuzz_app(
    make_app: Callable[..., APIFlask], aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[[str], APIFlask]:
    """Apps on FRACTAL_CLOUD=aws: the Ec2Cloud the factory builds, its EC2 calls answered by the moto server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", aws_env)

    def build(kind: str) -> APIFlask:
        app = make_app(kind, cloud="aws")
        assert isinstance(app.extensions["fractal"].cloud, Ec2Cloud)
        return app

    return build


@pytest.mark.parametrize("kind", ["public", "admin", "host"])
def test_every_api_conforms_on_aws(
    kind: str,
    aws_fuzz_app: Callable[[str], APIFlask],
    aws_env: str,
    world: World,
    factories: Factories,
    user_headers: Callable[..., dict[str, str]],
    admin_headers: dict[str, str],
) -> None:
    headers = {
        "public": user_headers(world.user_id),
        "admin": admin_headers,
        "host": {"Authorization": f"Bearer {world.host_secret}"},
    }[kind]
    # An active image with no instances: a scaler pass run through the admin API has something to launch on EC2.
    factories.image(region="us-west-2", client_commit_hash="aws-fuzz", ami_id="ami-0f0f0f0f")
    report = fuzz(aws_fuzz_app(kind), headers, world, max_examples=AWS_MAX_EXAMPLES)
    assert not report.failures, "\n\n".join(report.failures)
    if kind == "admin":
        # The reconcile endpoint got past validation and ran passes that launched on moto's EC2.
        assert "POST /admin/scaling/reconcile" in report.succeeded
        ec2 = boto3.client("ec2", region_name="us-west-2", endpoint_url=aws_env)
        tag = {"Name": "tag:fractal:client-commit-hash", "Values": ["aws-fuzz"]}
        launched = [i for r in ec2.describe_instances(Filters=[tag])["Reservations"] for i in r["Instances"]]
        assert launched, "no pass reached EC2"
