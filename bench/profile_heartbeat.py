"""The heartbeat, in-process: calls, round trips, CPU and a cProfile, against the naive reference.

    python bench/profile_heartbeat.py [--quick] [--requests N] [--profile N] [--top N]

Deterministic measures first, for a machine shared with other jobs: Python function calls per request (counted
with ``sys.setprofile``, 200 requests of each: bare hello, reference heartbeat, heartbeat) and Postgres round
trips per heartbeat (BEGIN, the checkout's bounds, statements, COMMIT/ROLLBACK, counted at the driver). Then CPU
per request (Flask's test client, one thread, the cheapest of 5 slices, the reference and the project
alternating) and a cProfile of ``--profile`` heartbeats (CPU clock), summarised by part and by function. Same
fleet and bodies as bench/yardsticks.py: 1,000 hosts, each reporting its 2 RUNNING mandelboxes and metrics; every
host has sent one heartbeat before the counting starts.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h
from bench import reference_app
from bench.heartbeats import heartbeat_body
from bench.yardsticks import HOSTS, seed

# Parts of a request, by the file a function lives in (first match wins), for the cProfile summary.
PARTS: list[tuple[str, re.Pattern[str]]] = [
    ("sqlalchemy", re.compile(r"sqlalchemy/")),
    ("psycopg2 (driver, incl. waits)", re.compile(r"psycopg2|<method '(execute|commit|rollback)' of 'psycopg2")),
    ("apiflask / pydantic (validation, output)", re.compile(r"apiflask/|pydantic|webargs|marshmallow")),
    ("structlog / logging", re.compile(r"structlog/|logging/|fractal/observability")),
    ("prometheus", re.compile(r"prometheus|fractal/metrics")),
    ("werkzeug / flask", re.compile(r"werkzeug/|flask/")),
    ("fractal (host service, auth)", re.compile(r"fractal/(host_service|auth)")),
    ("fractal (other)", re.compile(r"fractal/")),
    ("json", re.compile(r"json/")),
]


class RoundTrips:
    """Counts what one heartbeat sends to Postgres, at the psycopg2 connection (every path goes through it)."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.statements: Counter[str] = Counter()

    def connection_factory(self) -> type:
        import psycopg2.extensions

        trips = self

        class CountingCursor(psycopg2.extensions.cursor):  # type: ignore[misc]
            def execute(self, query: Any, vars: Any = None) -> Any:
                connection = self.connection
                if not connection.autocommit and connection.status == psycopg2.extensions.STATUS_READY:
                    trips.seen["BEGIN (sent by psycopg2)"] += 1
                text = query.decode() if isinstance(query, bytes) else str(query)
                trips.statements[" ".join(text.split())[:100]] += 1
                trips.seen["statements"] += 1
                return super().execute(query, vars)

        class CountingConnection(psycopg2.extensions.connection):  # type: ignore[misc]
            def cursor(self, *args: Any, **kwargs: Any) -> Any:
                kwargs.setdefault("cursor_factory", CountingCursor)
                return super().cursor(*args, **kwargs)

            def commit(self) -> None:
                if self.status != psycopg2.extensions.STATUS_READY:
                    trips.seen["COMMIT"] += 1
                super().commit()

            def rollback(self) -> None:
                if self.status != psycopg2.extensions.STATUS_READY:
                    trips.seen["ROLLBACK"] += 1
                super().rollback()

        return CountingConnection

    def clear(self) -> None:
        self.seen.clear()
        self.statements.clear()

    def lines(self, n: int) -> list[str]:
        total = sum(v for k, v in self.seen.items() if k != "statements")
        total += self.seen["statements"]
        out = [f"  {total / n:5.2f}  round trips per heartbeat"]
        out += [f"  {count / n:5.2f}  {name}" for name, count in sorted(self.seen.items())]
        out += [f"    {count / n:5.2f}  {text}" for text, count in self.statements.most_common()]
        return out


def count_calls(send: Callable[[int], Any], first: int, count: int) -> float:
    calls = 0

    def tracer(_frame: Any, event: str, _arg: Any) -> None:
        nonlocal calls
        if event == "call" or event == "c_call":
            calls += 1

    sys.setprofile(tracer)
    try:
        for k in range(first, first + count):
            send(k)
    finally:
        sys.setprofile(None)
    return calls / count


def summarise(profile: cProfile.Profile, n: int, top: int) -> list[str]:
    stats = pstats.Stats(profile)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in raw.values())
    parts: Counter[str] = Counter()
    for (filename, _line, name), (_cc, _nc, tt, _ct, _callers) in raw.items():
        where = f"{filename}:{name}"
        part = next((label for label, pattern in PARTS if pattern.search(where)), "other (stdlib, builtins)")
        parts[part] += tt
    out = [f"cProfile of {n} heartbeats: {total / n * 1000:.3f} ms per request under the profiler; own time by part:"]
    out += [f"  {share / total * 100:5.1f} %  {label}" for label, share in parts.most_common()]
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(top)
    out.append(text.getvalue())
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    out.append(text.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = h.load_parser(__doc__)
    parser.add_argument("--requests", type=int, default=None, help="heartbeats per CPU slice set (default 1000)")
    parser.add_argument("--profile", type=int, default=1000, help="heartbeats under cProfile (0: none)")
    parser.add_argument("--top", type=int, default=40, help="functions listed from the profile")
    parser.add_argument("--save", type=Path, default=None, help="write the raw profile here (pstats format)")
    args = parser.parse_args(argv)
    n = args.requests or (100 if args.quick else 1000)
    report = h.Report("profile_heartbeat", args.quick, client="flask test client, 1 thread")

    from fractal.blueprints import HOST_BLUEPRINTS
    from fractal.database import create_db_engine
    from fractal.factory import create_app

    trips = RoundTrips()
    lines: list[str] = []
    with h.workdir("profile-heartbeat") as work, h.bench_database("profhb") as url:
        seed(url)
        h.vacuum_analyze(url)
        keypair = h.new_keypair()
        settings = h.app_settings(url, keypair, "profhb")
        with h.apps_in_process(url, keypair, work / "apps.log"):
            app = create_app(blueprints=HOST_BLUEPRINTS, settings=settings)
            # For the count only: the same engine as the factory's, on a psycopg2 connection that counts what it
            # sends (its Python-level wrappers would add to the CPU figures, so those use the factory's engine).
            state = app.extensions["fractal"]
            plain = state.engine
            counting = create_db_engine(
                settings,
                connect_args={
                    "connect_timeout": 3,
                    "application_name": "fractal",
                    "connection_factory": trips.connection_factory(),
                },
            )
            host = app.test_client()
            reference = reference_app.app.test_client()
            beats = [(h.host_secret(k), heartbeat_body(k)) for k in range(HOSTS)]
            ours = h.heartbeat_sender(host, "/host/heartbeat", beats)
            theirs = h.heartbeat_sender(reference, "/heartbeat", beats)
            hello = lambda _k: h.expect_status(reference.get("/hello"), 200)  # noqa: E731
            for k in range(HOSTS):  # every host has beaten once; memos and connections warm
                ours(k)
                theirs(k)

            calls = {
                "bare": count_calls(hello, 0, 200),
                "ref_heartbeat": count_calls(theirs, 0, 200),
                "heartbeat": count_calls(ours, 0, 200),
            }
            for name, value in calls.items():
                report.add(f"{name}_calls", value, "function calls per request (Python and C)")
            state.session_factory.configure(bind=counting)
            for k in range(20):
                ours(k)
            trips.clear()
            for k in range(200):
                ours(k)
            state.session_factory.configure(bind=plain)
            counting.dispose()
            lines += ["Postgres, per heartbeat (200, warm):", *trips.lines(200)]
            report.add("heartbeat_round_trips", (sum(trips.seen.values())) / 200, "Postgres round trips per request")

            size = max(1, n // 5)
            slices: dict[str, list[float]] = {"ref_heartbeat": [], "heartbeat": []}
            for chunk in range(5):
                for name, send in (("ref_heartbeat", theirs), ("heartbeat", ours)):
                    first = chunk * size
                    started = time.process_time()
                    for k in range(first, first + size):
                        send(k)
                    slices[name].append((time.process_time() - started) / size * 1000)
            cpu = {name: min(values) for name, values in slices.items()}
            for name, value in cpu.items():
                report.add(f"{name}_cpu_ms", value, "ms of CPU per request", requests=5 * size)
            report.add("heartbeat_to_ref_cpu", cpu["heartbeat"] / cpu["ref_heartbeat"], "ratio of CPU per request")
            report.add("heartbeat_to_ref_calls", calls["heartbeat"] / calls["ref_heartbeat"], "ratio of calls")

            if args.profile:
                profile = cProfile.Profile(time.process_time)
                profile.enable()
                for k in range(args.profile):
                    ours(k)
                profile.disable()
                if args.save:
                    profile.dump_stats(args.save)
                lines += summarise(profile, args.profile, args.top)
            plain.dispose()
    print("\n".join(lines))
    report.emit()
    return 0


if __name__ == "__main__":
    h.run_main(main)
