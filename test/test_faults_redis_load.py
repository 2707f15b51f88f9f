"""Redis stopped and restarted while users assign and delete and hosts heartbeat from many threads.

test/test_degraded_mode.py checks each route once with Redis down; here the same outage happens under concurrent
load: no answer is a 5xx, the rate limit fails open (assigns keep succeeding while its storage is gone), and once
Redis is back the apps use it again (readiness ok, keys written under the prefix) without a restart.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
from apiflask import APIFlask

from fractal.database import SessionFactory
from test.factories import Factories
from test.redis_support import delete_prefixed, stop_process, throwaway_redis, unique_prefix

pytestmark = pytest.mark.slow

PHASE_S = 1.5
USERS = 5
ASSIGN = {"regions": ["us-east-1"], "client_commit_hash": "abc123"}


def restart_redis(port: int) -> subprocess.Popen[bytes]:
    """A new redis-server on the port the stopped one used (what a restarted container does)."""
    binary = shutil.which("redis-server")
    assert binary is not None
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    while True:
        try:
            client.ping()
            return process
        except redis.RedisError:
            assert time.monotonic() < deadline and process.poll() is None, "redis did not restart"
            time.sleep(0.05)


def test_redis_outage_under_concurrent_assign_and_heartbeat_load(
    make_app: Callable[..., APIFlask],
    committed_factory: SessionFactory,
    user_headers: Callable[..., dict[str, str]],
) -> None:
    factories = Factories(committed_factory())
    factories.image()
    # Room for every assign of the run even if the hosts' exits lag (a loaded machine starves their threads): a full
    # fleet would answer 503 NO_INSTANCE_AVAILABLE, which is right but not what this test is about.
    hosts = [factories.instance(mandelbox_capacity=1000) for _ in range(3)]
    with throwaway_redis() as (url, server):
        prefix = unique_prefix()
        overrides: dict[str, Any] = {
            "redis_url": url,
            "redis_prefix": prefix,
            "assign_rate_limit": "100000 per minute",  # counted in Redis while it is up; never reached
            "max_mandelboxes_per_user": 1000,
        }
        public = make_app("public", factory=committed_factory, **overrides)
        host_app = make_app("host", factory=committed_factory, **overrides)
        phase = ["up"]
        answers: dict[str, Counter[tuple[str, int]]] = {"up": Counter(), "down": Counter(), "back": Counter()}
        lock = threading.Lock()
        stop = threading.Event()
        crashes: list[BaseException] = []

        def record(kind: str, status: int) -> None:
            with lock:
                answers[phase[0]][(kind, status)] += 1

        def user(n: int) -> None:
            client = public.test_client()
            headers = user_headers(f"load-{n}")
            try:
                while not stop.is_set():
                    answer = client.post("/mandelbox/assign", json=ASSIGN, headers=headers)
                    # A refusal is counted with its error code, so a failure says which (capacity or a dependency).
                    refused = answer.status_code >= 500 and (answer.get_json() or {}).get("error")
                    record(f"assign {refused}" if refused else "assign", answer.status_code)
                    if answer.status_code == 201:
                        gone = client.delete(f"/mandelbox/{answer.get_json()['mandelbox_id']}", headers=headers)
                        record("delete", gone.status_code)
                    record("regions", client.get("/regions", headers=headers).status_code)
            except BaseException as error:  # a crash in a thread must fail the test, not vanish
                crashes.append(error)

        def host(instance_name: str, secret: str) -> None:
            client = host_app.test_client()
            auth = {"Authorization": f"Bearer {secret}"}
            try:
                while not stop.is_set():
                    beat = client.post("/host/heartbeat", json={"instance_name": instance_name}, headers=auth)
                    record("heartbeat", beat.status_code)
                    for mandelbox_id in beat.get_json().get("stop_mandelboxes", []) if beat.status_code == 200 else []:
                        done = client.put(f"/host/mandelboxes/{mandelbox_id}", json={"status": "EXITED"}, headers=auth)
                        record("exit", done.status_code)
                    time.sleep(0.02)
            except BaseException as error:
                crashes.append(error)

        threads = [threading.Thread(target=user, args=(n,)) for n in range(USERS)]
        threads += [threading.Thread(target=host, args=(i.instance_name, s)) for i, s in hosts]
        for thread in threads:
            thread.start()
        restarted: subprocess.Popen[bytes] | None = None
        try:
            time.sleep(PHASE_S)
            with lock:
                phase[0] = "down"
            stop_process(server)
            time.sleep(PHASE_S)
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            restarted = restart_redis(port)
            with lock:
                phase[0] = "back"
            time.sleep(PHASE_S)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        try:
            assert not crashes, crashes
            assert not any(thread.is_alive() for thread in threads)
            for name, counter in answers.items():
                statuses = {status for (_kind, status) in counter}
                assert all(status < 500 for status in statuses), (name, counter)
                # Work went on in every phase: assigns (rate limit failing open while down), deletes, heartbeats.
                assert counter[("assign", 201)] > 0, (name, counter)
                assert counter[("heartbeat", 200)] > 0, (name, counter)
                assert set(counter) <= {
                    ("assign", 201),
                    ("delete", 202),
                    ("regions", 200),
                    ("heartbeat", 200),
                    ("exit", 200),
                    ("exit", 409),  # the host raced a user's DELETE; both outcomes are legal
                }, (name, counter)

            # Recovered without a restart: readiness is green, and the apps write to Redis again once their
            # back-off after the outage ends (the cache bypasses Redis for 5 s, the limiter re-probes it).
            client = public.test_client()
            reader = redis.Redis.from_url(url)
            deadline = time.monotonic() + 15
            while client.get("/readyz").status_code != 200 or not reader.keys(f"{prefix}*"):
                assert time.monotonic() < deadline, (client.get("/readyz").get_json(), "nothing written to Redis")
                answer = client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("after"))
                assert answer.status_code < 500
                if answer.status_code == 201:
                    client.delete(f"/mandelbox/{answer.get_json()['mandelbox_id']}", headers=user_headers("after"))
                client.get("/regions", headers=user_headers("after"))
                time.sleep(0.2)
            reader.close()
        finally:
            if restarted is not None:
                delete_prefixed(url, prefix)
                stop_process(restarted)
