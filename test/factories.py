"""Factory helpers: rows with sensible defaults, any field overridable."""

from __future__ import annotations

import itertools
from typing import Any

from sqlalchemy.orm import Session

from fractal.auth.hosts import generate_host_secret, hash_host_secret
from fractal.models import Image, Instance, InstanceStatus

_counter = itertools.count(1)


class Factories:
    def __init__(self, session: Session) -> None:
        self.session = session

    def image(self, **overrides: Any) -> Image:
        values: dict[str, Any] = {
            "region": "us-east-1",
            "client_commit_hash": "abc123",
            "ami_id": "ami-12345678",
            "active": True,
            "instance_type": "g4dn.xlarge",
            "mandelbox_capacity": 4,
        }
        values.update(overrides)
        image = Image(**values)
        self.session.add(image)
        self.session.commit()
        return image

    def instance(self, **overrides: Any) -> tuple[Instance, str]:
        """An instance row and its host secret (ACTIVE by default)."""
        secret = overrides.pop("secret", None) or generate_host_secret()
        n = next(_counter)
        values: dict[str, Any] = {
            "instance_name": f"i-test-{n:05d}",
            "region": "us-east-1",
            "client_commit_hash": "abc123",
            "ami_id": "ami-12345678",
            "instance_type": "g4dn.xlarge",
            "ip": f"10.0.{n // 250}.{n % 250 + 1}",
            "mandelbox_capacity": 4,
            "live_mandelboxes": 0,
            "status": InstanceStatus.ACTIVE,
            "host_secret_hash": hash_host_secret(secret),
        }
        values.update(overrides)
        instance = Instance(**values)
        self.session.add(instance)
        self.session.commit()
        return instance, secret
