"""Cloud providers against real counterparts: EC2 on a moto server on loopback (plus botocore's Stubber for the
errors moto cannot produce), and the simulated fleet speaking HTTP to a real host API server."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto.server import ThreadedMotoServer
from sqlalchemy import select, update
from werkzeug.serving import make_server

from fractal.assignment.service import assign_mandelbox
from fractal.auth.hosts import hash_host_secret
from fractal.cloud import build_cloud_provider
from fractal.cloud.base import TAG_INSTANCE_NAME, CloudError, CloudState, HostRef, LaunchRequest
from fractal.cloud.ec2 import Ec2Cloud
from fractal.cloud.local import LocalCloud
from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.models import Image, Instance, InstanceStatus
from fractal.scaling.reconcile import reconcile_fleet
from test.waiting import wait_for

S = InstanceStatus
REQUEST = LaunchRequest("host-1", "us-east-1", "v1", "ami-12345678", "g4dn.xlarge", 4, "s3cr3t", "http://h:8002")


# --- EC2 on moto ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def ec2(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return boto3.client("ec2", region_name="us-east-1")


def moto_instances(ec2: Any, **filters: str) -> list[dict[str, Any]]:
    """moto's view; filter names with ``_`` for ``-`` (``commit`` means the fractal commit tag)."""
    names = {"commit": "tag:fractal:client-commit-hash"}
    flt = [{"Name": names.get(k, k.replace("_", "-")), "Values": [v]} for k, v in filters.items()]
    pages = ec2.get_paginator("describe_instances").paginate(Filters=flt)
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def test_build_cloud_provider_follows_settings_and_connects_to_nothing(settings: Settings) -> None:
    assert isinstance(build_cloud_provider(Settings(**{**settings.model_dump(), "cloud": "aws"})), Ec2Cloud)
    assert isinstance(build_cloud_provider(settings), LocalCloud)


def test_ec2_launch_tags_user_data_describe_and_terminate(ec2: Any, settings: Settings) -> None:
    aws = Settings(**{**settings.model_dump(), "cloud": "aws", "aws_key_name": "ops", "aws_instance_profile": "fr"})
    ec2.create_key_pair(KeyName="ops")
    iam = boto3.client("iam", region_name="us-east-1", endpoint_url=ec2.meta.endpoint_url)
    iam.create_instance_profile(InstanceProfileName="fr")
    cloud = Ec2Cloud(aws)
    launched = cloud.launch(REQUEST)
    (instance,) = moto_instances(ec2, instance_id=launched.cloud_provider_id)
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert (
        tags["Name"] == "host-1" and tags[TAG_INSTANCE_NAME] == "host-1" and tags["fractal:client-commit-hash"] == "v1"
    )
    assert instance["ImageId"] == "ami-12345678" and instance["InstanceType"] == "g4dn.xlarge"
    assert instance["KeyName"] == "ops"
    user_data = ec2.describe_instance_attribute(InstanceId=launched.cloud_provider_id, Attribute="userData")
    script = base64.b64decode(user_data["UserData"]["Value"]).decode()
    assert "FRACTAL_HOST_SECRET=s3cr3t" in script and "FRACTAL_HOST_API_URL=http://h:8002" in script
    assert "FRACTAL_INSTANCE_NAME=host-1" in script

    # Describe finds hosts by provider id and, without one, by the instance-name tag; unknown ids are just absent.
    by_id = cloud.describe("us-east-1", [HostRef("host-1", launched.cloud_provider_id), HostRef("x", "i-0abc")])
    by_name = cloud.describe("us-east-1", [HostRef("host-1", None)])
    assert [(h.cloud_provider_id, h.state) for h in by_id] == [(launched.cloud_provider_id, CloudState.RUNNING)]
    assert [h.cloud_provider_id for h in by_name] == [launched.cloud_provider_id]
    cloud.terminate("us-east-1", [launched.cloud_provider_id])
    assert moto_instances(ec2, instance_id=launched.cloud_provider_id)[0]["State"]["Name"] == "terminated"


def test_reconcile_on_ec2_launches_the_buffer_and_terminates_an_inactive_image(
    ec2: Any, committed_factory: SessionFactory, settings: Settings
) -> None:
    aws = Settings(**{**settings.model_dump(), "cloud": "aws", "target_free_mandelboxes": 8})
    with committed_factory() as session:
        session.add(
            Image(
                region="us-east-1",
                client_commit_hash="moto1",
                ami_id="ami-12345678",
                active=True,
                instance_type="g4dn.xlarge",
                mandelbox_capacity=4,
            )
        )
        session.commit()
    cloud = Ec2Cloud(aws)
    report = reconcile_fleet(committed_factory, settings=aws, cloud=cloud)
    assert report.count("launch") == 2, report.errors
    with committed_factory() as session:
        rows = {r.cloud_provider_id: r for r in session.scalars(select(Instance))}
    running = moto_instances(ec2, commit="moto1", instance_state_name="running")
    assert {i["InstanceId"] for i in running} == set(rows)
    for instance in running:  # each host got the secret of its own row
        data = ec2.describe_instance_attribute(InstanceId=instance["InstanceId"], Attribute="userData")
        script = base64.b64decode(data["UserData"]["Value"]).decode()
        secret = script.split("FRACTAL_HOST_SECRET=")[1].split("\n")[0].strip("'")
        assert hash_host_secret(secret) == rows[instance["InstanceId"]].host_secret_hash

    with committed_factory() as session:
        session.execute(update(Image).values(active=False))
        session.commit()
    report = reconcile_fleet(committed_factory, settings=aws, cloud=cloud)
    assert report.count("drain") == 2 and report.count("terminated") == 2, report.actions
    states = {i["InstanceId"]: i["State"]["Name"] for i in moto_instances(ec2, commit="moto1")}
    assert set(states) == set(rows) and set(states.values()) == {"terminated"}
    with committed_factory() as session:
        assert set(session.scalars(select(Instance.status))) == {S.TERMINATED}


# --- EC2 error paths with botocore's Stubber ----------------------------------------------------------------
def stubbed(settings: Settings) -> tuple[Ec2Cloud, Stubber, list[float]]:
    client = boto3.client("ec2", region_name="us-east-1", endpoint_url="http://127.0.0.1:9")  # never contacted
    stubber = Stubber(client)
    stubber.activate()
    sleeps: list[float] = []
    cloud = Ec2Cloud(
        settings,
        max_attempts=4,
        base_delay_s=0.5,
        max_delay_s=2,
        sleep=sleeps.append,
        client_factory=lambda _region: client,
    )
    return cloud, stubber, sleeps


RUN_OK = {"Instances": [{"InstanceId": "i-0123456789abcdef0"}], "OwnerId": "1", "ReservationId": "r-1"}


def test_insufficient_capacity_is_retried_with_bounded_backoff(settings: Settings) -> None:
    cloud, stubber, sleeps = stubbed(settings)
    stubber.add_client_error("run_instances", service_error_code="InsufficientInstanceCapacity", http_status_code=500)
    stubber.add_client_error("run_instances", service_error_code="RequestLimitExceeded", http_status_code=503)
    stubber.add_response("run_instances", RUN_OK)
    assert cloud.launch(REQUEST).cloud_provider_id == "i-0123456789abcdef0"
    stubber.assert_no_pending_responses()
    assert len(sleeps) == 2 and 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0


def test_capacity_errors_give_up_after_the_last_attempt(settings: Settings) -> None:
    cloud, stubber, sleeps = stubbed(settings)
    for _ in range(4):
        stubber.add_client_error("run_instances", service_error_code="InsufficientInstanceCapacity")
    with pytest.raises(CloudError) as failure:
        cloud.launch(REQUEST)
    assert failure.value.code == "InsufficientInstanceCapacity" and not failure.value.maybe_done
    assert len(sleeps) == 3 and max(sleeps) <= 2


def test_final_errors_are_not_retried(settings: Settings) -> None:
    cloud, stubber, sleeps = stubbed(settings)
    stubber.add_client_error("terminate_instances", service_error_code="UnauthorizedOperation", http_status_code=403)
    with pytest.raises(CloudError) as failure:
        cloud.terminate("us-east-1", ["i-0123456789abcdef0"])
    assert failure.value.code == "UnauthorizedOperation" and sleeps == []


def test_throttled_terminate_is_retried(settings: Settings) -> None:
    cloud, stubber, sleeps = stubbed(settings)
    stubber.add_client_error("terminate_instances", service_error_code="RequestLimitExceeded", http_status_code=503)
    stubber.add_response("terminate_instances", {"TerminatingInstances": []}, {"InstanceIds": ["i-0123456789abcdef0"]})
    cloud.terminate("us-east-1", ["i-0123456789abcdef0"])
    stubber.assert_no_pending_responses()
    assert len(sleeps) == 1


def test_a_failing_ec2_terminate_leaves_the_row_terminating(
    settings: Settings, session_factory: SessionFactory, db: Any, factories: Any
) -> None:
    cloud, stubber, _ = stubbed(settings)
    factories.instance(instance_name="keep", cloud_provider_id="i-0123456789abcdef0", status=S.TERMINATING)
    running = {"Reservations": [{"Instances": [{"InstanceId": "i-0123456789abcdef0", "State": {"Name": "running"}}]}]}
    stubber.add_response("describe_instances", running)
    for _ in range(4):
        stubber.add_client_error("terminate_instances", service_error_code="InternalError", http_status_code=500)
    report = reconcile_fleet(session_factory, settings=settings, cloud=cloud)
    assert report.errors and report.count("terminated") == 0
    db.expire_all()
    assert db.get(Instance, "keep").status is S.TERMINATING


# --- the simulated fleet against a real host API server ----------------------------------------------------
@pytest.fixture
def host_api(make_app: Callable[..., Any], committed_factory: SessionFactory) -> Iterator[str]:
    app = make_app("host", factory=committed_factory, heartbeat_interval_s=0.2)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


def statuses(factory: SessionFactory) -> dict[str, InstanceStatus]:
    with factory() as session:
        return dict(session.execute(select(Instance.instance_name, Instance.status)).all())  # type: ignore[arg-type]


@pytest.mark.slow
def test_simulated_hosts_boot_shake_hands_serve_and_drain(
    host_api: str, committed_factory: SessionFactory, settings: Settings
) -> None:
    local = Settings(
        **{**settings.model_dump(), "host_api_url": host_api, "local_boot_delay_s": 0.2, "target_free_mandelboxes": 4}
    )
    with committed_factory() as session:
        session.add(
            Image(
                region="us-west-2",
                client_commit_hash="sim1",
                ami_id="ami-local",
                active=True,
                instance_type="local",
                mandelbox_capacity=2,
            )
        )
        session.commit()
    cloud = LocalCloud(local)
    try:
        assert reconcile_fleet(committed_factory, settings=local, cloud=cloud).count("launch") == 2
        assert set(statuses(committed_factory).values()) == {S.PRE_CONNECTION}
        wait_for(
            lambda: set(statuses(committed_factory).values()) == {S.ACTIVE}, timeout_s=15, message="every host ACTIVE"
        )

        with committed_factory() as session:
            box = assign_mandelbox(
                session, user_id="sim-user", regions=["us-west-2"], client_commit_hash="sim1"
            ).assignment
        agent = cloud.agent(box.instance_name)
        assert agent is not None
        agent.claim(box.mandelbox_id)  # GET + PUT CONNECTING + PUT RUNNING over HTTP

        with committed_factory() as session:
            session.execute(update(Image).values(active=False))
            session.commit()
        report = reconcile_fleet(committed_factory, settings=local, cloud=cloud)
        assert report.count("drain") == 2
        idle = next(n for n in statuses(committed_factory) if n != box.instance_name)
        assert statuses(committed_factory)[idle] is S.TERMINATED
        assert statuses(committed_factory)[box.instance_name] is S.DRAINING  # its user is still playing
        agent.report(box.mandelbox_id, "EXITED")
        reconcile_fleet(committed_factory, settings=local, cloud=cloud)
        assert statuses(committed_factory)[box.instance_name] is S.TERMINATED
        wait_for(lambda: not agent.running, timeout_s=5, message="the agent to stop")
    finally:
        cloud.shutdown()
