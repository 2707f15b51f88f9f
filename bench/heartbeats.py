"""Heartbeat ingestion rate from 1,000 simulated hosts against the host API on gunicorn.

    python bench/heartbeats.py [--quick]

1,000 ACTIVE instances are registered by inserting rows whose host secrets are known (hashed exactly as
fractal.auth.hosts.hash_host_secret does), each running 2 live mandelboxes. wrk (16 connections) rotates the
hosts: every request carries one host's secret and its own body (its instance name, its two mandelboxes as
RUNNING, a few metrics), as a real host agent sends them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text

from bench import harness as h

HOSTS = 1000
LIVE_PER_HOST = 2


def heartbeat_body(n: int) -> str:
    return json.dumps(
        {
            "instance_name": h.instance_name(n),
            "mandelboxes": [
                {"mandelbox_id": str(h.live_mandelbox_id(n, k)), "status": "RUNNING"} for k in range(LIVE_PER_HOST)
            ],
            "metrics": {"cpu_percent": 12.5 + n % 50, "memory_mib": 2048 + n, "gpu_percent": 31.0, "uptime_s": 3600},
        },
        separators=(",", ":"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = h.load_parser(__doc__, quick_help="short smoke run")
    parser.add_argument("--hosts", type=int, default=HOSTS)
    args = parser.parse_args(argv)

    quick = args.quick
    warm_s, run_s = (1, 3) if quick else (3, 20)
    report = h.Report("heartbeats", quick, client=h.wrk_version())

    with h.workdir("heartbeats") as work, h.bench_database("heartbeats") as url:
        h.log(f"registering {args.hosts} hosts with known secrets")
        with h.connect(url) as connection:
            h.seed_images(connection)
            h.seed_instances(connection, first=0, count=args.hosts)
            h.seed_live_mandelboxes(connection, instances=args.hosts, per_instance=LIVE_PER_HOST)
        h.vacuum_analyze(url)
        rows = ((h.host_secret(n), heartbeat_body(n)) for n in range(args.hosts))
        request_file = h.write_request_file(work, "heartbeats.tsv", rows)
        keypair = h.new_keypair()

        with h.gunicorn(
            app="host_service_app:app", database_url=url, keypair=keypair, workdir=work, workers=args.workers
        ) as server:
            report.add("workers", len(server.worker_pids()), "processes", config=server.config)

            def load(seconds: float) -> h.LoadResult:
                return h.run_wrk(
                    server,
                    method="POST",
                    path="/host/heartbeat",
                    request_file=request_file,
                    duration_s=seconds,
                    connections=args.connections,
                )

            h.log("warming up")
            load(warm_s)
            h.log(f"POST /host/heartbeat from {args.hosts} hosts for {run_s}s")
            result = load(run_s)
            report.add_load("heartbeats", result)

        with h.connect(url) as connection:
            recorded = connection.execute(text("SELECT count(*) FROM heartbeats")).scalar_one()
        report.add("hosts_recorded", int(recorded), "hosts", of=args.hosts)
        report.target("heartbeats_rate", result.rate >= 3000, ">= 3000 req/s")
        if result.errors_status:
            report.notes.append("WARN some heartbeats were not 2xx: see the gunicorn log")
    report.emit()
    return 0


if __name__ == "__main__":
    h.run_main(main)
