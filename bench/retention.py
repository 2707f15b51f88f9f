"""Does a history purge slow assign down? Assign p50 with no purge, then while a purge runs over millions of rows.

    python bench/retention.py [--quick] [--rows N] [--seconds S]

One gunicorn, one database: 100 ACTIVE instances, then ``--rows`` rows of history past its retention (default
1,500,000: two thirds events, one third EXITED mandelboxes, all ended 200 days ago) beside 100,000 young ones that
must stay. Assign (16 connections, distinct users) is measured in ``--windows`` pairs of windows: one with no purge,
one while ``fractal.retention.purge_history`` (the scaler's purge: batches of FRACTAL_PURGE_BATCH_SIZE, each its own
transaction, FRACTAL_PURGE_PAUSE_MS after each) works through the old rows from this process; between batches the
purge parks while a no-purge window runs. Alternating over the same minutes, the two groups see the same machine (a
shared one drifts). Reported: the median window p50/p99 of each group and their ratio, the purge's rate during the
load and its slowest batch; afterwards the rest is purged (no pause) and nothing old, everything young, is checked.
"""

from __future__ import annotations

import statistics
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
    parser.add_argument("--seconds", type=float, default=None, help="load per window (default 4, quick 2)")
    parser.add_argument("--windows", type=int, default=None, help="pairs of windows (default 5, quick 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="purge batch (default FRACTAL_PURGE_BATCH_SIZE)")
    parser.add_argument("--pause-ms", type=int, default=None, help="pause per batch (default FRACTAL_PURGE_PAUSE_MS)")
    args = parser.parse_args(argv)

    quick = args.quick
    rows = args.rows or (60_000 if quick else 1_500_000)
    young = 5_000 if quick else YOUNG_ROWS
    seconds = args.seconds or (2 if quick else 4)
    windows = args.windows or (2 if quick else 5)
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

            # The purge runs in this process; between batches (no transaction open) it parks while the gate is
            # shut, so windows without purge and with purge alternate over the same minutes and the machine's own
            # drift (other jobs) falls on both alike.
            gate, parked, stop = threading.Event(), threading.Event(), threading.Event()
            outcome: dict[str, Any] = {}

            def on_batch(_kind: PurgeKind, _count: int) -> None:
                if not gate.is_set():
                    parked.set()
                    gate.wait()
                    parked.clear()

            def purge() -> None:
                with session_scope(factory) as session:
                    outcome["report"] = purge_history(
                        session,
                        settings=settings,
                        max_s=3600,
                        on_batch=on_batch,
                        should_continue=lambda: not stop.is_set(),
                    )

            purger = threading.Thread(target=purge, name="purge", daemon=True)
            off: list[h.LoadResult] = []
            on: list[h.LoadResult] = []
            on_s = 0.0
            for window in range(windows):
                h.log(f"window {window + 1}/{windows}: assign without purge")
                gate.clear()
                while purger.is_alive() and not parked.wait(0.1):
                    pass  # the batch under way finishes first
                off.append(measure(seconds))
                h.log(f"window {window + 1}/{windows}: assign while the purge works through {rows:,} rows")
                gate.set()
                if window == 0:
                    purger.start()
                began = time.perf_counter()
                on.append(measure(seconds))
                on_s += time.perf_counter() - began
            stop.set()
            gate.set()
            purger.join(120)
        engine.dispose()

        during = outcome["report"]
        h.log(f"finishing the purge ({rows - during.total:,} rows left)")
        with session_scope(factory) as session:
            rest = purge_history(session, settings=Settings(**{**overrides, "purge_pause_ms": 0}), max_s=3600)
        engine.dispose()

        def group(prefix: str, results: list[h.LoadResult]) -> float:
            requests = sum(r.requests for r in results)
            duration = sum(r.duration_s for r in results)
            p50 = statistics.median(r.p50_ms for r in results)
            report.add(f"{prefix}_rate", requests / duration if duration else 0.0, "req/s", requests=requests)
            report.add(f"{prefix}_p50", p50, "ms", windows=[round(r.p50_ms, 1) for r in results])
            report.add(f"{prefix}_p99", statistics.median(r.p99_ms for r in results), "ms")
            report.add(f"{prefix}_non_2xx", sum(r.errors_status + r.errors_socket for r in results), "requests")
            return p50

        quiet_p50 = group("assign_no_purge", off)
        during_p50 = group("assign_during_purge", on)
        report.add("purge_batch_size", settings.purge_batch_size, "rows")
        report.add("purge_pause_ms", settings.purge_pause_ms, "ms")
        report.add("purge_rows_during_load", during.total, "rows", batches=during.batches, seconds=round(on_s, 1))
        report.add("purge_rate_during_load", during.total / on_s if on_s else 0.0, "rows/s")
        report.add("purge_slowest_batch_ms", during.slowest_batch_s * 1000, "ms")
        report.add("purge_rest_rows", rest.total, "rows", duration_s=round(rest.duration_s, 1), pause_ms=0)
        report.add("purge_rest_rate", rest.total / rest.duration_s if rest.duration_s else 0.0, "rows/s")
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
        ratio = during_p50 / quiet_p50 if quiet_p50 else 0.0
        report.add("p50_during_purge_to_no_purge", ratio, "ratio")
        report.target("p50_during_purge_to_no_purge", ratio <= 1.2, "<= 1.2")
        purged = during.total + rest.total
        errors = during.errors + rest.errors
        report.target("purge_rows", purged == rows and not errors and old_left == 0, f"== {rows:,}, no error")
        report.target("young_events_kept", young_left == young, f"== {young:,}")
    report.emit()
    return 0


if __name__ == "__main__":
    h.run_main(main)
