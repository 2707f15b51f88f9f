"""Brute force on the real handshake endpoint: failed attempts (401s) are limited per client address and per claimed
instance name, and a correct secret is never refused because others failed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fractal.models import InstanceStatus
from test.factories import Factories


def test_failed_handshakes_are_rate_limited_per_address(make_app: Callable[..., Any], factories: Factories) -> None:
    instance, secret = factories.instance(status=InstanceStatus.PRE_CONNECTION)
    client = make_app("host", handshake_failure_rate_limit="3 per minute").test_client()
    body = {
        "instance_name": instance.instance_name,
        "ip": "10.9.9.9",
        "client_commit_hash": instance.client_commit_hash,
        "mandelbox_capacity": 4,
    }

    def handshake(credential: str, address: str = "203.0.113.7") -> Any:
        return client.post(
            "/host/handshake",
            json=body,
            headers={"Authorization": f"Bearer {credential}"},
            environ_base={"REMOTE_ADDR": address},
        )

    assert [handshake(f"guess-{n}").status_code for n in range(3)] == [401, 401, 401]
    blocked = handshake("guess-4")  # this address spent its failure budget: wrong secrets now get 429
    assert blocked.status_code == 429
    assert blocked.json["error"] == "RATE_LIMITED"
    assert int(blocked.headers["Retry-After"]) >= 1

    # The right secret from that same address (a shared NAT) is never refused for the others' failures.
    accepted = handshake(secret)
    assert accepted.status_code == 200
    assert accepted.json["status"] == "ACTIVE"


def test_failures_for_one_instance_name_are_limited_across_addresses(
    make_app: Callable[..., Any], factories: Factories
) -> None:
    instance, secret = factories.instance(status=InstanceStatus.PRE_CONNECTION)
    client = make_app("host", handshake_failure_rate_limit="3 per minute").test_client()
    body = {
        "instance_name": instance.instance_name,
        "ip": "10.9.9.9",
        "client_commit_hash": instance.client_commit_hash,
        "mandelbox_capacity": 4,
    }

    def handshake(credential: str, address: str, name: str = instance.instance_name) -> Any:
        return client.post(
            "/host/handshake",
            json={**body, "instance_name": name},
            headers={"Authorization": f"Bearer {credential}"},
            environ_base={"REMOTE_ADDR": address},
        )

    codes = [handshake("guess", f"198.51.100.{n}").status_code for n in range(4)]
    assert codes == [401, 401, 401, 429]  # a distributed guess at one name
    assert handshake("guess", "198.51.100.50", name="i-other").status_code == 401  # other names unaffected
    assert handshake(secret, "198.51.100.99").status_code == 200


def test_a_conflict_is_not_a_failed_handshake(make_app: Callable[..., Any], factories: Factories) -> None:
    lost, lost_secret = factories.instance(status=InstanceStatus.ACTIVE, client_commit_hash="abc123")
    fresh, fresh_secret = factories.instance(status=InstanceStatus.PRE_CONNECTION)
    client = make_app("host", handshake_failure_rate_limit="3 per minute").test_client()

    def handshake(instance: Any, credential: str, commit: str) -> Any:
        return client.post(
            "/host/handshake",
            json={
                "instance_name": instance.instance_name,
                "ip": "10.9.9.9",
                "client_commit_hash": commit,
                "mandelbox_capacity": 4,
            },
            headers={"Authorization": f"Bearer {credential}"},
            environ_base={"REMOTE_ADDR": "203.0.113.7"},
        )

    # One misconfigured host behind a shared address retries its 409 over and over...
    assert [handshake(lost, lost_secret, "other-commit").status_code for _ in range(5)] == [409] * 5
    # ...and neither its neighbour nor a wrong guess after it is refused for that.
    assert handshake(fresh, "guess", fresh.client_commit_hash).status_code == 401
    assert handshake(fresh, fresh_secret, fresh.client_commit_hash).status_code == 200
