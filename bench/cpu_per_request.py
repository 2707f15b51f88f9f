"""CPU per request, in-process: the project's apps against the naive reference, one thread, no HTTP server.

    python bench/cpu_per_request.py [--quick] [--requests N]

On a machine shared with other jobs, req/s moves by 2-3x from one minute to the next; the CPU time a request
costs the process that serves it moves much less. This drives the same requests as bench/yardsticks.py (a fresh
RS256 token and a new user for every assign, half with a fresh Idempotency-Key; 1,000 hosts' heartbeats with
their secrets and 2 RUNNING mandelboxes each) through Flask's test client, one request at a time, and divides the
process CPU time (time.process_time) by the requests, in 5 slices of which the cheapest counts (other jobs can
only add to a slice's CPU time): bare hello, healthz, reference assign, assign, reference heartbeat, heartbeat.
The database's and Redis's own CPU are not in it (see yardsticks' db CPU column), nor gunicorn's (the same for
every app). The apps log as in production; the log lines go to a file.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h
from bench import reference_app
from bench.heartbeats import heartbeat_body
from bench.yardsticks import HOSTS, mint_tokens, seed

CHUNKS = 5


def main(argv: list[str] | None = None) -> int:
    parser = h.load_parser(__doc__)
    parser.add_argument("--requests", type=int, default=None, help="requests per assign phase (default 1000)")
    args = parser.parse_args(argv)
    n = args.requests or (100 if args.quick else 1000)
    report = h.Report("cpu_per_request", args.quick, client="flask test client, 1 thread")

    from fractal.blueprints import HOST_BLUEPRINTS, PUBLIC_BLUEPRINTS
    from fractal.config import Settings
    from fractal.factory import create_app

    with h.workdir("cpu") as work, h.bench_database("cpu") as url:
        seed(url)
        h.vacuum_analyze(url)
        keypair = h.new_keypair()
        warm = 20
        tokens = mint_tokens(keypair, [f"bench-cpu-user-{k}" for k in range(2 * (n + warm))])
        body = h.assign_body()
        settings = Settings(
            database_url=url,
            redis_url=h.REDIS_SERVER_URL,
            redis_prefix=f"fractal-bench-cpu-{uuid.uuid4().hex[:8]}:",
            env="test",
            jwt_public_key=keypair.public_pem,
            assign_rate_limit=h.NEVER_REFUSING_RATE_LIMIT,
            max_mandelboxes_per_user=h.MAX_PER_USER,
        )
        os.environ.update(
            {
                "DATABASE_URL": url,
                "FRACTAL_JWT_PUBLIC_KEY": keypair.public_pem,
                "FRACTAL_MAX_MANDELBOXES_PER_USER": str(h.MAX_PER_USER),
            }
        )
        log_file = (work / "apps.log").open("w")
        saved_stderr = os.dup(2)
        os.dup2(log_file.fileno(), 2)  # the apps' JSON lines (written to fd 2) go to the file
        try:
            public = create_app(blueprints=PUBLIC_BLUEPRINTS, settings=settings).test_client()
            host = create_app(blueprints=HOST_BLUEPRINTS, settings=settings).test_client()
            reference = reference_app.app.test_client()
            beats = [(h.host_secret(k), heartbeat_body(k)) for k in range(HOSTS)]

            def measure(name: str, send: Callable[[int], Any], count: int, warm_up: int = warm) -> float:
                for k in range(warm_up):
                    send(k)
                # In CHUNKS slices; the cheapest slice counts: what else runs on the machine can only add to a
                # slice's CPU time (cache and frequency effects), never take from it.
                size = max(1, count // CHUNKS)
                slices = []
                for first in range(warm_up, warm_up + size * CHUNKS, size):
                    started = time.process_time()
                    for k in range(first, first + size):
                        send(k)
                    slices.append((time.process_time() - started) / size * 1000)
                per_request = min(slices)
                mean = sum(slices) / len(slices)
                report.add(f"{name}_cpu_ms", per_request, "ms of CPU per request", requests=size * CHUNKS, mean=mean)
                return per_request

            def expect(answer: Any, status: int) -> None:
                if answer.status_code != status:
                    raise RuntimeError(f"{answer.status_code}: {answer.get_data(as_text=True)[:300]}")

            def assign(client: Any, path: str, offset: int) -> Callable[[int], None]:
                def send(k: int) -> None:
                    headers = {"Authorization": f"Bearer {tokens[offset + k]}"}
                    if k % 2 == 0:
                        headers["Idempotency-Key"] = uuid.uuid4().hex
                    expect(client.post(path, data=body, headers=headers, content_type="application/json"), 201)

                return send

            def heartbeat(client: Any, path: str) -> Callable[[int], None]:
                def send(k: int) -> None:
                    secret, beat = beats[k % HOSTS]
                    headers = {"Authorization": f"Bearer {secret}"}
                    expect(client.post(path, data=beat, headers=headers, content_type="application/json"), 200)

                return send

            cpu = {
                "bare": measure("bare", lambda _k: expect(reference.get("/hello"), 200), 4 * n),
                "healthz": measure("healthz", lambda _k: expect(public.get("/healthz"), 200), 4 * n),
                "ref_assign": measure("ref_assign", assign(reference, "/assign", 0), n),
                "assign": measure("assign", assign(public, "/mandelbox/assign", n + warm), n),
                # Every host has sent a heartbeat before (as in production, where each does every few seconds).
                "ref_heartbeat": measure("ref_heartbeat", heartbeat(reference, "/heartbeat"), n, HOSTS),
                "heartbeat": measure("heartbeat", heartbeat(host, "/host/heartbeat"), n, HOSTS),
            }
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            log_file.close()

    report.add("healthz_to_bare", cpu["healthz"] / cpu["bare"], "ratio of CPU per request")
    report.add("assign_to_ref", cpu["assign"] / cpu["ref_assign"], "ratio of CPU per request")
    report.add("heartbeat_to_ref", cpu["heartbeat"] / cpu["ref_heartbeat"], "ratio of CPU per request")
    report.emit()
    return 0


if __name__ == "__main__":
    h.run_main(main)
