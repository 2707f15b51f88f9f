"""Assigns through the deployment: nginx → N gunicorn replicas of the public API → PgBouncer (transaction mode)
→ Postgres, all on this machine, started by the test suite's helpers (test/deployment.py).

    python bench/deployment.py [--quick] [--replicas 2] [--workers 1] [--pool 8] [--connections 16]

wrk (16 keep-alive connections, many distinct users) drives POST /mandelbox/assign first at one replica directly
(still through PgBouncer), then through nginx at all of them. While each run lasts, the CPU time of every part is
read from /proc: the gunicorn workers, nginx, PgBouncer, the Postgres backends serving the database, and wrk. The
figures: rate, p50/p99, CPU milliseconds per assign by part, and assigns per second per core actually used
(rate / (CPU seconds used / wall seconds)), the number to multiply by cores when sizing.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2

from bench import harness as h
from test.deployment import Deployment, deployment

INSTANCES = 100
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Target:
    """What harness.run_wrk needs of a server: its URL."""

    url: str


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def cpu_s(pids: list[int]) -> float:
    """utime + stime of ``pids`` (seconds); a pid that is gone counts 0."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def parts(d: Deployment) -> dict[str, list[int]]:
    """The processes of each part, right now (Postgres backends: those connected to the bench's database)."""
    connection = psycopg2.connect(d.database_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (d.database,)
            )
            backends = [int(row[0]) for row in cursor.fetchall()]
    finally:
        connection.close()
    workers = [w for replica in d.apis["public"] for w in children(replica.process.pid)]
    return {
        "app": workers,
        "nginx": [d.nginx.process.pid, *children(d.nginx.process.pid)],
        "pgbouncer": [d.pgbouncer.process.pid],
        "postgres": backends,
    }


def measured(report: h.Report, name: str, d: Deployment, target: Target, file: Path, seconds: float, c: int) -> None:
    before_parts = parts(d)
    before = {part: cpu_s(pids) for part, pids in before_parts.items()}
    wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = h.run_wrk(
        target,  # type: ignore[arg-type]
        method="POST",
        path="/mandelbox/assign",
        request_file=file,
        duration_s=seconds,
        connections=c,
    )
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    after_parts = parts(d)
    used = {
        part: cpu_s(sorted(set(before_parts[part]) | set(after_parts[part]))) - before[part] for part in before_parts
    }
    used["wrk"] = (wrk_after.ru_utime + wrk_after.ru_stime) - (wrk_before.ru_utime + wrk_before.ru_stime)
    report.add_load(name, result)
    assigns = max(1, result.requests)
    for part, seconds_used in used.items():
        report.add(f"{name}_cpu_ms_per_assign_{part}", 1000 * seconds_used / assigns, "ms")
    cores_used = sum(used.values()) / result.duration_s
    server_cores = (sum(used.values()) - used["wrk"]) / result.duration_s
    report.add(f"{name}_cores_used", cores_used, "cores", without_wrk=round(server_cores, 2))
    report.add(f"{name}_assigns_per_core", result.rate / server_cores if server_cores else 0.0, "req/s/core")
    busiest = max((p for p in used if p != "wrk"), key=lambda p: used[p])
    report.add(f"{name}_busiest_part", busiest, "", share=round(used[busiest] / max(1e-9, sum(used.values())), 2))


def main(argv: list[str] | None = None) -> int:
    parser = h.load_parser(__doc__)
    parser.add_argument("--replicas", type=int, default=2, help="gunicorn replicas of the public API")
    parser.add_argument("--pool", type=int, default=8, help="PgBouncer default_pool_size (server connections)")
    parser.add_argument("--users", type=int, default=None)
    args = parser.parse_args(argv)
    quick = args.quick
    warm_s, run_s = (1, 3) if quick else (3, 20)
    users = args.users or (200 if quick else 4000)
    workers = args.workers or 1
    report = h.Report("deployment", quick, client=h.wrk_version())
    keypair = h.new_keypair()
    prefix = f"fractal-bench:{os.getpid()}:deployment:"
    env = {
        "FRACTAL_ENV": "test",
        "FRACTAL_JWT_PUBLIC_KEY": keypair.public_pem,
        "REDIS_URL": h.REDIS_SERVER_URL,
        "FRACTAL_REDIS_PREFIX": prefix,
        "FRACTAL_ASSIGN_RATE_LIMIT": h.NEVER_REFUSING_RATE_LIMIT,
        "FRACTAL_MAX_MANDELBOXES_PER_USER": str(h.MAX_PER_USER),
        "FRACTAL_LOG_LEVEL": "WARNING",
    }
    with h.workdir("deployment") as work:
        tokens = h.mint_user_tokens(keypair, users)
        assign_file = h.write_request_file(work, "assign.tsv", ((t, h.assign_body()) for t in tokens))
        h.log(f"starting nginx, {args.replicas} public replicas x {workers} worker(s), PgBouncer (pool {args.pool})")
        with deployment(
            env,
            replicas=args.replicas,
            scalers=0,
            roles=("public",),
            pool_size=args.pool,
            workers=workers,
            threads=4,
            db_pool_size=4,
            db_max_overflow=0,
        ) as d:
            with h.connect(d.database_url) as connection:
                h.seed_images(connection)
                h.seed_instances(connection, first=0, count=INSTANCES)
            h.vacuum_analyze(d.database_url)
            report.add("replicas", args.replicas, "gunicorn masters", workers=workers, threads=4)
            report.add("pgbouncer_pool", args.pool, "server connections")
            direct = Target(d.apis["public"][0].url)
            proxied = Target(d.url("public"))
            for target in (direct, proxied):
                h.run_wrk(
                    target,  # type: ignore[arg-type]
                    method="POST",
                    path="/mandelbox/assign",
                    request_file=assign_file,
                    duration_s=warm_s,
                    connections=args.connections,
                )
            h.log(f"one replica directly (through PgBouncer) for {run_s}s")
            measured(report, "one_replica", d, direct, assign_file, run_s, args.connections)
            time.sleep(1)
            h.log(f"all {args.replicas} replicas through nginx for {run_s}s")
            measured(report, "nginx_all", d, proxied, assign_file, run_s, args.connections)
            pools = [p for p in d.pgbouncer.show("POOLS") if p["database"] == d.database]
            if pools:
                report.add("pgbouncer_maxwait", float(pools[0]["maxwait"]), "s")
    report.emit()
    return 0


if __name__ == "__main__":
    h.run_main(main)
