"""EC2 through boto3. Clients are built on first use per region; ``AWS_ENDPOINT_URL_EC2`` redirects them (moto)."""

from __future__ import annotations

import functools
import random
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from fractal.cloud.base import (
    MANAGED_BY,
    TAG_CLIENT_COMMIT_HASH,
    TAG_INSTANCE_NAME,
    TAG_MANAGED_BY,
    TAG_REGION,
    CloudError,
    CloudHost,
    CloudState,
    HostRef,
    LaunchedHost,
    LaunchRequest,
    enforce_send_deadline,
)
from fractal.config import Settings

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

log = structlog.get_logger(__name__)

# Worth retrying: EC2 has no room for this type right now, or we are being throttled. Anything else is final.
RETRYABLE_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "InternalError",
        "Unavailable",
        "ServiceUnavailable",
    }
)
# EC2 filters take at most 200 values each.
FILTER_CHUNK = 200
TERMINATE_CHUNK = 1000


def render_user_data(request: LaunchRequest) -> str:
    """The boot script: writes the host service's environment (readable by root only) for its unit to read."""
    env = {
        "FRACTAL_HOST_API_URL": request.host_api_url,
        "FRACTAL_INSTANCE_NAME": request.instance_name,
        "FRACTAL_HOST_SECRET": request.host_secret,
        "FRACTAL_CLIENT_COMMIT_HASH": request.client_commit_hash,
        "FRACTAL_MANDELBOX_CAPACITY": str(request.mandelbox_capacity),
    }
    lines = "\n".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
    return (
        "#!/bin/sh\n"
        "set -eu\n"
        "umask 077\n"
        "mkdir -p /etc/fractal\n"
        "cat > /etc/fractal/host.env <<'FRACTAL_ENV'\n"
        f"{lines}\n"
        "FRACTAL_ENV\n"
        "systemctl restart fractal-host.service 2>/dev/null || true\n"
    )


class Ec2Cloud:
    """CloudProvider on EC2. Thread-safe: boto3 clients are, and the client cache is locked."""

    name = "aws"

    def __init__(
        self,
        settings: Settings,
        *,
        max_attempts: int = 5,
        base_delay_s: float = 0.5,
        max_delay_s: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
        client_factory: Callable[[str], EC2Client] | None = None,
    ) -> None:
        self._settings = settings
        self._max_attempts = max_attempts
        self._base_delay_s = base_delay_s
        self._max_delay_s = max_delay_s
        self._sleep = sleep
        self._client_factory = client_factory or self._new_client
        self._clients: dict[str, EC2Client] = {}
        self._lock = threading.Lock()

    # --- CloudProvider -------------------------------------------------------------------------------
    def launch(self, request: LaunchRequest) -> LaunchedHost:
        """run_instances for one host; retried on capacity and throttling errors with bounded backoff."""
        params: dict[str, Any] = {
            "ImageId": request.ami_id,
            "InstanceType": request.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            # Same token on a retry: EC2 starts the host at most once even if an answer was lost.
            "ClientToken": request.instance_name[:64],
            "UserData": render_user_data(request),
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [
                {
                    "ResourceType": "instance",
                    "Tags": [
                        {"Key": "Name", "Value": request.instance_name},
                        {"Key": TAG_INSTANCE_NAME, "Value": request.instance_name},
                        {"Key": TAG_REGION, "Value": request.region},
                        {"Key": TAG_CLIENT_COMMIT_HASH, "Value": request.client_commit_hash},
                        {"Key": TAG_MANAGED_BY, "Value": MANAGED_BY},
                    ],
                }
            ],
        }
        settings = self._settings
        if settings.aws_subnet_id:
            params["SubnetId"] = settings.aws_subnet_id
        if settings.aws_security_group_ids:
            params["SecurityGroupIds"] = list(settings.aws_security_group_ids)
        if settings.aws_instance_profile:
            key = "Arn" if settings.aws_instance_profile.startswith("arn:") else "Name"
            params["IamInstanceProfile"] = {key: settings.aws_instance_profile}
        if settings.aws_key_name:
            params["KeyName"] = settings.aws_key_name
        client = self._client(request.region)
        response = self._call("run_instances", lambda: client.run_instances(**params))
        instances = response.get("Instances") or []
        if not instances:
            raise CloudError("run_instances returned no instance", code="NoInstance")
        return LaunchedHost(instance_name=request.instance_name, cloud_provider_id=instances[0]["InstanceId"])

    def terminate(self, region: str, cloud_provider_ids: Sequence[str]) -> None:
        """terminate_instances in chunks; an id EC2 no longer knows is already gone (callers describe first)."""
        client = self._client(region)
        ids = list(dict.fromkeys(cloud_provider_ids))
        for start in range(0, len(ids), TERMINATE_CHUNK):
            chunk = ids[start : start + TERMINATE_CHUNK]
            self._call("terminate_instances", functools.partial(client.terminate_instances, InstanceIds=chunk))

    def describe(self, region: str, hosts: Sequence[HostRef]) -> list[CloudHost]:
        """Filter-based describe (unknown ids are simply absent instead of failing the whole call)."""
        client = self._client(region)
        ids = sorted(
            {h.cloud_provider_id for h in hosts if h.cloud_provider_id and h.cloud_provider_id.startswith("i-")}
        )
        names = sorted({h.instance_name for h in hosts if not (h.cloud_provider_id or "").startswith("i-")})
        found: dict[str, CloudHost] = {}
        for filter_name, values in (("instance-id", ids), (f"tag:{TAG_INSTANCE_NAME}", names)):
            for start in range(0, len(values), FILTER_CHUNK):
                chunk = values[start : start + FILTER_CHUNK]
                for host in self._describe_filtered(client, filter_name, chunk):
                    found[host.cloud_provider_id] = host
        return list(found.values())

    # --- internals -------------------------------------------------------------------------------------
    def _describe_filtered(self, client: EC2Client, filter_name: str, values: list[str]) -> Iterator[CloudHost]:
        def pages() -> list[dict[str, Any]]:
            paginator = client.get_paginator("describe_instances")
            return [dict(page) for page in paginator.paginate(Filters=[{"Name": filter_name, "Values": values}])]

        for page in self._call("describe_instances", pages):
            for reservation in page.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    tags = {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}
                    yield CloudHost(
                        instance_name=tags.get(TAG_INSTANCE_NAME),
                        cloud_provider_id=instance["InstanceId"],
                        state=_state(instance.get("State", {}).get("Name")),
                    )

    def _call(self, operation: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` with bounded exponential backoff (full jitter) on retryable EC2 errors."""
        for attempt in range(1, self._max_attempts + 1):
            try:
                return fn()
            except ClientError as error:
                code = str(error.response.get("Error", {}).get("Code", "Unknown"))
                retryable = code in RETRYABLE_CODES
                if not retryable or attempt == self._max_attempts:
                    log.warning("ec2.call_failed", operation=operation, code=code, attempt=attempt)
                    raise CloudError(f"EC2 {operation} failed: {code}", code=code, retryable=retryable) from error
                delay = min(self._max_delay_s, self._base_delay_s * 2 ** (attempt - 1))
                delay = random.uniform(delay / 2, delay)
                log.info("ec2.retry", operation=operation, code=code, attempt=attempt, delay_s=round(delay, 3))
                self._sleep(delay)
            except BotoCoreError as error:
                # Connection trouble: the request may or may not have reached EC2; the caller decides.
                raise CloudError(
                    f"EC2 {operation} failed: {type(error).__name__}", code=type(error).__name__, maybe_done=True
                ) from error
        raise AssertionError("unreachable")  # pragma: no cover

    def _client(self, region: str) -> EC2Client:
        with self._lock:
            client = self._clients.get(region)
            if client is None:
                try:
                    client = self._client_factory(region)
                except (BotoCoreError, ValueError) as error:  # InvalidRegionError, no endpoint for the region...
                    # Nothing was asked of the cloud: the request certainly did not take effect.
                    raise CloudError(
                        f"EC2 client for region {region!r} cannot be created: {type(error).__name__}",
                        code=type(error).__name__,
                    ) from error
                _guard_actions(client)
                self._clients[region] = client
            return client

    @staticmethod
    def _new_client(region: str) -> EC2Client:
        # Our own loop retries (with knowledge of which errors are worth it); botocore's would multiply attempts.
        config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=30)
        return boto3.session.Session().client("ec2", region_name=region, config=config)


# The calls that change the fleet; describe is a read and is never refused.
GUARDED_OPERATIONS = ("RunInstances", "TerminateInstances")


def _guard_actions(client: Any) -> None:
    """Check the caller's send deadline (``fractal.cloud.base.send_deadline``) in botocore's before-send hook: the
    last moment before the signed request goes on the wire, on every attempt."""
    events = getattr(getattr(client, "meta", None), "events", None)
    if events is None:  # a test double
        return
    for operation in GUARDED_OPERATIONS:
        events.register(f"before-send.ec2.{operation}", _refuse_past_deadline)


def _refuse_past_deadline(**kwargs: Any) -> None:
    enforce_send_deadline(str(kwargs.get("event_name", "ec2 request")).rsplit(".", 1)[-1])


def _state(name: str | None) -> CloudState:
    try:
        return CloudState(name or "pending")
    except ValueError:
        return CloudState.PENDING
