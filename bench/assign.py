"""Assign throughput and latency against the no-I/O baseline, in one run on one gunicorn.

    python bench/assign.py [--quick]

16 keep-alive connections (wrk, 2 threads) rotate the tokens of many distinct users; JWT verification and the
Redis rate limiter are on (the limit never refuses); 100 ACTIVE instances with room to spare. Figures: /healthz
rate (baseline), assign rate and p50/p99 over 20 s and then 60 s (rows piling up), the ratios, and the RSS of each
gunicorn worker afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h

INSTANCES = 100


def main(argv: list[str] | None = None) -> int:
    parser = h.load_parser(__doc__, quick_help="short smoke run (seconds, not minutes)")
    parser.add_argument("--users", type=int, default=None, help="distinct users (tokens) to rotate")
    args = parser.parse_args(argv)

    quick = args.quick
    warm_s, base_s, short_s, long_s = (1, 2, 2, 4) if quick else (3, 20, 20, 60)
    users = args.users or (100 if quick else 2000)
    report = h.Report("assign", quick, client=h.wrk_version())

    with h.workdir("assign") as work, h.bench_database("assign") as url:
        h.log(f"seeding {INSTANCES} instances over {len(h.REGIONS)} regions")
        with h.connect(url) as connection:
            h.seed_images(connection)
            h.seed_instances(connection, first=0, count=INSTANCES)
        h.vacuum_analyze(url)
        h.log(f"minting {users} user tokens")
        keypair = h.new_keypair()
        tokens = h.mint_user_tokens(keypair, users)
        body = h.assign_body()
        assign_file = h.write_request_file(work, "assign.tsv", ((t, body) for t in tokens))
        health_file = h.write_request_file(work, "healthz.tsv", ((t, "") for t in tokens))

        with h.gunicorn(app="app:app", database_url=url, keypair=keypair, workdir=work, workers=args.workers) as server:
            workers = server.worker_pids()
            h.log(f"gunicorn ({server.config}) on {server.url}, workers {workers}")
            report.add("workers", len(workers), "processes", config=server.config)

            def load(path: str, method: str, file: Path, seconds: float) -> h.LoadResult:
                return h.run_wrk(
                    server,
                    method=method,
                    path=path,
                    request_file=file,
                    duration_s=seconds,
                    connections=args.connections,
                )

            h.log("warming up")
            load("/healthz", "GET", health_file, warm_s)
            load("/mandelbox/assign", "POST", assign_file, warm_s)

            h.log(f"baseline GET /healthz for {base_s}s")
            baseline = load("/healthz", "GET", health_file, base_s)
            report.add_load("healthz", baseline)
            h.log(f"POST /mandelbox/assign for {short_s}s")
            short = load("/mandelbox/assign", "POST", assign_file, short_s)
            report.add_load(f"assign_{short_s}s", short)
            h.log(f"POST /mandelbox/assign for {long_s}s")
            long = load("/mandelbox/assign", "POST", assign_file, long_s)
            report.add_load(f"assign_{long_s}s", long)

            rss = {pid: h.rss_kib(pid) for pid in server.worker_pids()}

        ratio = short.rate / baseline.rate if baseline.rate else 0.0
        decay = long.rate / short.rate if short.rate else 0.0
        report.add("assign_to_baseline", ratio, "ratio")
        report.add(f"assign_{long_s}s_to_{short_s}s", decay, "ratio")
        for n, (pid, kib) in enumerate(sorted(rss.items())):
            report.add(f"rss_worker_{n}", kib / 1024, "MiB", pid=pid)
        if rss:
            report.add("rss_worker_max", max(rss.values()) / 1024, "MiB")
        report.add("mandelboxes_created", h.count_rows(url, "mandelboxes"), "rows")

        report.target("assign_to_baseline", ratio >= 0.35, ">= 0.35")
        report.target(f"assign_{short_s}s_rate", short.rate >= 1500, ">= 1500 req/s")
        report.target(f"assign_{short_s}s_p99", short.p99_ms <= 20, "<= 20 ms")
        report.target(f"assign_{long_s}s_to_{short_s}s", decay >= 0.9, ">= 0.90")
        if short.errors_status or long.errors_status:
            report.notes.append("WARN some assigns were not 2xx: see the gunicorn log / events table")
    report.emit()
    return 0


if __name__ == "__main__":
    h.run_main(main)
