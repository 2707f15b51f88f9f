"""Does a history purge slow assign down? Assign p50 with no purge, then while a purge runs over millions of rows.

    python bench/retention.py [--quick] [--rows N] [--seconds S]

One gunicorn, one database: 100 ACTIVE instances, then ``--rows`` rows of history past its retention (default
1,500,000: two thirds events, one third EXITED mandelboxes, all ended 200 days ago) beside 100,000 young ones that
must stay. Phase 1 measures assign (16 connections, distinct users) with no purge; phase 2 measures the same load
while ``fractal.retention.purge_history`` (the scaler's purge: batches of FRACTAL_PURGE_BATCH_SIZE, each its own
transaction, FRACTAL_PURGE_PAUSE_MS after each) works through the old rows from this process; phase 3 measures it
again once the purge is done (how much the machine itself drifted). Reported: the p50/p99 of each phase, ratios to
phase 1, the purge's rows, duration, rate and its slowest batch, and how much of phase 2 the purge overlapped.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text

from bench import harness as h
from bench.history import end_live_mandelboxes
from fractal.config import Settings
from fractal.database import create_db_engine, create_session_factory, session_scope
from fractal.retention import PurgeKind, purge_history

YOUNG_ROWS = 100_000
INSTANCES = 100


def seed_old_history(url: str, *, rows: int, young: int) -> tuple[int, int]:
    """``rows`` rows past retention (events and EXITED mandelboxes, 2:1) and ``young`` young events; set-based."""
    boxes = rows // 3
    events = rows - boxes
    with h.connect(url) as connection:
        connection.execute(
            text(
                "INSERT INTO events (created_at, kind, actor, instance_name, detail) "
                "SELECT now() - interval '200 days' - make_interval(secs => n), 'mandelbox_status', 'bench', "
                "'bench-i-' || lpad((n % :instances)::text, 6, '0'), '{\"to\": \"EXITED\"}'::jsonb "
                "FROM generate_series(1, CAST(:n AS int)) AS n"
            ),
            {"n": events, "instances": INSTANCES},
        )
        connection.execute(
            text(
                "INSERT INTO events (created_at, kind, actor, detail) "
                "SELECT now() - make_interval(secs => n), 'young', 'bench', '{}'::jsonb "
                "FROM generate_series(1, CAST(:n AS int)) AS n"
            ),
            {"n": young},
        )
        connection.execute(
            text(
                """
                INSERT INTO mandelboxes (mandelbox_id, instance_name, user_id, session_id, status,
                                         created_at, status_changed_at, ended_at, end_reason)
                SELECT md5('bench-old-mb-' || n)::uuid,
                       'bench-i-' || lpad((n % :instances)::text, 6, '0'),
                       'bench-old-user-' || (n % 100000), NULL, 'EXITED',
                       now() - interval '201 days', now() - interval '200 days',
                       now() - interval '200 days' - make_interval(secs => n), 'HOST_EXITED'
                FROM generate_series(1, CAST(:n AS int)) AS n
                """
            ),
            {"n": boxes, "instances": INSTANCES},
        )
        connection.commit()
    return events, boxes


def main(argv: list[str] | None = None) -> int:
    parser = h.load_parser(__doc__, quick_help="short smoke run: 60,000 old rows, 3 s per phase")
    parser.add_argument("--rows", type=int, default=None, help="old rows to purge (default 1,500,000; quick 60,000)")
    parser.add_argument("--seconds", type=float, default=None, help="load per phase (default 15, quick 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="purge batch (default FRACTAL_PURGE_BATCH_SIZE)")
    parser.add_argument("--pause-ms", type=int, default=None, help="pause per batch (default FRACTAL_PURGE_PAUSE_MS)")
    args = parser.parse_args(argv)

    quick = args.quick
    rows = args.rows or (60_000 if quick else 1_500_000)
    young = 5_000 if quick else YOUNG_ROWS
    seconds = args.seconds or (3 if quick else 15)
    users = 100 if quick else 2000
    report = h.Report("retention", quick, client=h.wrk_version())

    with h.workdir("retention") as work, h.bench_database("retention") as url:
        with h.connect(url) as connection:
            h.seed_images(connection)
            h.seed_instances(connection, first=0, count=INSTANCES)
        h.log(f"seeding {rows:,} old rows and {young:,} young ones")
        started = time.perf_counter()
        events, boxes = seed_old_history(url, rows=rows, young=young)
        report.add("seed_s", time.perf_counter() - started, "s")
        h.vacuum_analyze(url)
        report.add("old_events", events, "rows")
        report.add("old_mandelboxes", boxes, "rows")

        keypair = h.new_keypair()
        tokens = h.mint_user_tokens(keypair, users)
        assign_file = h.write_request_file(work, "assign.tsv", ((t, h.assign_body()) for t in tokens))
        overrides: dict[str, Any] = {"database_url": url, "env": "test", "retention_delete_log_objects": False}
        if args.batch_size:
            overrides["purge_batch_size"] = args.batch_size
        if args.pause_ms is not None:
            overrides["purge_pause_ms"] = args.pause_ms
        settings = Settings(**overrides)
        engine = create_db_engine(settings)
        factory = create_session_factory(engine)

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

            h.log("phase 1: assign, no purge")
            quiet = measure(seconds)
            report.add_load("assign_no_purge", quiet)
            end_live_mandelboxes(url)

            h.log(f"phase 2: assign while the purge works through {rows:,} rows")
            outcome: dict[str, Any] = {"slowest_batch_s": 0.0}
            last = [time.perf_counter()]

            def on_batch(_kind: PurgeKind, _count: int) -> None:
                now = time.perf_counter()
                outcome["slowest_batch_s"] = max(outcome["slowest_batch_s"], now - last[0])
                last[0] = now

            def purge() -> None:
                began = time.perf_counter()
                last[0] = began
                try:
                    with session_scope(factory) as session:
                        outcome["report"] = purge_history(session, settings=settings, max_s=3600, on_batch=on_batch)
                finally:
                    outcome["duration_s"] = time.perf_counter() - began

            purger = threading.Thread(target=purge, name="purge", daemon=True)
            load_started = time.perf_counter()
            purger.start()
            during = measure(seconds)
            load_s = time.perf_counter() - load_started
            report.add_load("assign_during_purge", during)
            purger.join(3600)
            end_live_mandelboxes(url)
            # The same load again once the purge is done: how much the machine itself drifted meanwhile.
            h.log("phase 3: assign, purge done")
            after = measure(seconds)
            report.add_load("assign_after_purge", after)

        engine.dispose()
        purged = outcome["report"]
        duration = outcome["duration_s"]
        report.add("purge_batch_size", settings.purge_batch_size, "rows")
        report.add("purge_pause_ms", settings.purge_pause_ms, "ms")
        report.add("purge_rows", purged.total, "rows", batches=purged.batches, errors=len(purged.errors))
        report.add("purge_duration_s", duration, "s")
        report.add("purge_rate", purged.total / duration if duration else 0.0, "rows/s")
        report.add("purge_slowest_batch_ms", outcome["slowest_batch_s"] * 1000, "ms")
        report.add("purge_overlap_of_phase_2", min(duration, load_s) / load_s if load_s else 0.0, "ratio")
        with h.connect(url) as connection:
            old_left = connection.execute(
                text(
                    "SELECT (SELECT count(*) FROM events WHERE created_at < now() - interval '100 days')"
                    " + (SELECT count(*) FROM mandelboxes WHERE ended_at < now() - interval '100 days')"
                )
            ).scalar_one()
            young_left = connection.execute(text("SELECT count(*) FROM events WHERE kind = 'young'")).scalar_one()
        report.add("old_rows_left", int(old_left), "rows")
        report.add("young_events_kept", int(young_left), "rows")
        ratio = during.p50_ms / quiet.p50_ms if quiet.p50_ms else 0.0
        report.add("p50_during_purge_to_no_purge", ratio, "ratio")
        report.add("p50_after_purge_to_no_purge", after.p50_ms / quiet.p50_ms if quiet.p50_ms else 0.0, "ratio")
        report.target("p50_during_purge_to_no_purge", ratio <= 1.2, "<= 1.2")
        report.target("purge_rows", purged.total == rows and not purged.errors, f"== {rows:,}, no error")
        report.target("young_events_kept", young_left == young, f"== {young:,}")
    report.emit()
    return 0


if __name__ == "__main__":
    h.run_main(main)
