"""Redis stopped mid-test: assign, regions and admin keep working, /readyz names Redis, nothing answers 500."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from apiflask import APIFlask

from fractal.models import InstanceStatus
from test.factories import Factories
from test.redis_support import stop_process, throwaway_redis, unique_prefix

pytestmark = pytest.mark.slow
Headers = Callable[..., dict[str, str]]
ASSIGN = {"regions": ["us-east-1"], "client_commit_hash": "abc123"}
IMAGE = {"ami_id": "ami-9", "active": True, "instance_type": "g4dn.xlarge", "mandelbox_capacity": 4}


def test_redis_outage_degrades_instead_of_failing(
    make_app: Callable[..., APIFlask], factories: Factories, user_headers: Headers, admin_headers: dict[str, str]
) -> None:
    factories.image()
    factories.instance(instance_name="roomy", mandelbox_capacity=10)
    factories.instance(instance_name="draining", region="eu-west-1", status=InstanceStatus.DRAINING)
    factories.image(region="eu-west-1")
    with throwaway_redis() as (url, server):
        overrides: dict[str, Any] = {
            "redis_url": url,
            "redis_prefix": unique_prefix(),
            "assign_rate_limit": "5 per minute",
        }
        public = make_app("public", **overrides).test_client()
        admin = make_app("admin", **overrides).test_client()
        assert public.get("/readyz").json["checks"]["redis"] == "ok"
        assert public.get("/regions", headers=user_headers()).status_code == 200
        assert public.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("before")).status_code == 201

        stop_process(server)

        answers = [
            public.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("during")),
            public.get("/regions", headers=user_headers()),
            admin.put("/admin/images/us-west-2/abc123", json=IMAGE, headers=admin_headers),
            admin.get("/admin/instances", headers=admin_headers),
            admin.get("/admin/images", headers=admin_headers),
            # No room in eu-west-1: the scaler nudge fails quietly, the answer is the usual 503.
            public.post("/mandelbox/assign", json={**ASSIGN, "regions": ["eu-west-1"]}, headers=user_headers("x")),
        ]
        assert [answer.status_code for answer in answers] == [201, 200, 200, 200, 200, 503]
        assert answers[-1].json["error"] == "NO_INSTANCE_AVAILABLE"
        # The image change was committed although its cache invalidation could not reach Redis.
        assert "us-west-2" in public.get("/regions", headers=user_headers()).json["regions"]

        for client in (public, admin):
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json["checks"] == {"database": "ok", "redis": "unavailable"}
            assert ready.json["error"] == "SERVICE_UNAVAILABLE" and "redis" in ready.json["message"]
        assert public.get("/healthz").status_code == 200


def test_readyz_names_redis_on_a_dead_port(make_app: Callable[..., APIFlask]) -> None:
    response = make_app("host", redis_url="redis://127.0.0.1:1/0").test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json["checks"]["redis"] == "unavailable"


def test_limits_fall_back_to_memory_and_return_to_redis_when_it_answers_again(
    make_app: Callable[..., APIFlask], factories: Factories, user_headers: Headers
) -> None:
    factories.image()
    factories.instance(mandelbox_capacity=10)
    prefix = unique_prefix()
    with throwaway_redis() as (url, server):
        client = make_app(
            "public", redis_url=url, redis_prefix=prefix, assign_rate_limit="3 per minute", max_mandelboxes_per_user=10
        ).test_client()
        assert client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u1")).status_code == 201
        stop_process(server)
        # Redis down: this process counts in memory, and still refuses past the limit.
        codes = [
            client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u2")).status_code for _ in range(4)
        ]
        assert codes == [201, 201, 201, 429]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with throwaway_redis(port) as (again, _server):
            time.sleep(1.2)  # the first re-check comes 1 s after the outage was noticed
            assert client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("u3")).status_code == 201
            keys = [key.decode() for key in redis.Redis.from_url(again).keys(f"{prefix}limits*")]
            assert len(keys) == 1 and "user:u3" in keys[0]  # counted in Redis again
