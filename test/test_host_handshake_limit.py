"""Brute force on the real handshake endpoint: failed attempts per client address are limited."""

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
    blocked = handshake(secret)  # even the right secret: this address spent its failure budget
    assert blocked.status_code == 429
    assert blocked.json["error"] == "RATE_LIMITED"
    assert int(blocked.headers["Retry-After"]) >= 1

    elsewhere = handshake(secret, address="198.51.100.2")
    assert elsewhere.status_code == 200
    assert elsewhere.json["status"] == "ACTIVE"
