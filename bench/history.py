"""Does assign slow down as the fleet and its history grow? p50 at 100 instances, 10,000, and 10,000 + 1 M rows.

    python bench/history.py [--quick]

One gunicorn, one database, three phases with the same load (16 connections, distinct users): 100 ACTIVE
instances; then 9,900 more (20 regions, every 10th on another client version); then 1,000,000 EXITED mandelboxes
of history spread over every instance and 100,000 users (the benchmarked users among them). Between phases the
live mandelboxes of the previous phase are ended (set-based), so each phase starts from the same live state, and
the tables are VACUUM ANALYZEd, as autovacuum would after a bulk change.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text

from bench import harness as h

HISTORY_USERS = 100_000


def end_live_mandelboxes(url: str) -> None:
    """The previous phase's live mandelboxes become history; every instance is empty again."""
    with h.connect(url) as connection:
        connection.execute(
            text(
                "UPDATE mandelboxes SET status = 'EXITED', ended_at = now(), end_reason = 'HOST_EXITED' "
                "WHERE status <> 'EXITED'"
            )
        )
        connection.execute(text("UPDATE instances SET live_mandelboxes = 0 WHERE live_mandelboxes <> 0"))
        connection.commit()
    h.vacuum_analyze(url)


def main(argv: list[str] | None = None) -> int:
    parser = h.load_parser(__doc__, quick_help="short smoke run: 1,000 instances, 50,000 rows")
    parser.add_argument("--seconds", type=float, default=None, help="load per phase (default 15, quick 3)")
    args = parser.parse_args(argv)

    quick = args.quick
    small, large, rows = (100, 1_000, 50_000) if quick else (100, 10_000, 1_000_000)
    seconds = args.seconds or (3 if quick else 15)
    users = 100 if quick else 2000
    rows_label = f"{rows // 1000}k" if rows < 1_000_000 else f"{rows // 1_000_000}M"
    report = h.Report("history", quick, client=h.wrk_version())

    with h.workdir("history") as work, h.bench_database("history") as url:
        with h.connect(url) as connection:
            h.seed_images(connection)
            h.seed_instances(connection, first=0, count=small)
        h.vacuum_analyze(url)
        keypair = h.new_keypair()
        tokens = h.mint_user_tokens(keypair, users)
        body = h.assign_body()
        assign_file = h.write_request_file(work, "assign.tsv", ((t, body) for t in tokens))

        with h.gunicorn(app="app:app", database_url=url, keypair=keypair, workdir=work, workers=args.workers) as server:

            def measure(seconds_: float) -> h.LoadResult:
                return h.run_wrk(
                    server,
                    method="POST",
                    path="/mandelbox/assign",
                    request_file=assign_file,
                    duration_s=seconds_,
                    connections=args.connections,
                )

            h.log("warming up")
            measure(1 if quick else 3)
            end_live_mandelboxes(url)

            h.log(f"phase 1: {small} instances")
            at_small = measure(seconds)
            report.add_load(f"assign_{small}_instances", at_small)
            end_live_mandelboxes(url)

            h.log(f"phase 2: seeding {large - small} more instances")
            with h.connect(url) as connection:
                h.seed_instances(connection, first=small, count=large - small, other_commit_every=10)
            h.vacuum_analyze(url)
            at_large = measure(seconds)
            report.add_load(f"assign_{large}_instances", at_large)
            end_live_mandelboxes(url)

            h.log(f"phase 3: seeding {rows:,} EXITED mandelboxes")
            with h.connect(url) as connection:
                h.seed_exited_mandelboxes(connection, count=rows, instances=large, users=HISTORY_USERS)
            h.vacuum_analyze(url)
            report.add("mandelbox_rows_before_phase_3", h.count_rows(url, "mandelboxes"), "rows")
            at_history = measure(seconds)
            report.add_load(f"assign_{large}_instances_{rows_label}_rows", at_history)

        base = at_small.p50_ms
        ratio_large = at_large.p50_ms / base if base else 0.0
        ratio_history = at_history.p50_ms / base if base else 0.0
        report.add(f"p50_{large}_instances_to_{small}", ratio_large, "ratio")
        report.add(f"p50_{large}_instances_{rows_label}_rows_to_{small}", ratio_history, "ratio")
        report.target(f"p50_{large}_instances_{rows_label}_rows_to_{small}", ratio_history <= 1.2, "<= 1.2")
    report.emit()
    return 0


if __name__ == "__main__":
    h.run_main(main)
