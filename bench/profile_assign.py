"""Where does assign time go? py-spy samples every gunicorn worker while wrk drives POST /mandelbox/assign.

    python bench/profile_assign.py [--quick] [--seconds N]      (or: ./commands bench profile_assign)

Same set-up as bench/assign.py (100 instances, distinct users, JWT and rate limiting on). py-spy (from PyPI:
`pip install py-spy`) records wall-clock stacks including waits (--idle), so time spent waiting on Postgres or
Redis shows up. Only samples inside a request (under Flask's wsgi_app) are summarised: inclusive and self share
per function, and a few coarse buckets (database, JWT, rate limiter, logging, serialisation). The raw collapsed
stacks are kept under bench/results/profiles/ for a flame graph (e.g. speedscope or inferno).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h
from fractal.auth.dev_keys import DevKeyPair

REQUEST_FRAME = "wsgi_app"
# Coarse buckets: the first matching rule (by frame text) wins for each sample, checked from the leaf upwards.
BUCKETS = (
    (
        "postgres (psycopg2 execute/commit, incl. waiting)",
        re.compile(r"do_execute|do_commit|do_rollback|_do_ping|pre_ping|psycopg2"),
    ),
    ("redis (rate limiter / cache round trips)", re.compile(r"redis/|limits/")),
    ("jwt verify (pyjwt/cryptography)", re.compile(r"jwt/|cryptography/")),
    ("sqlalchemy (compile, ORM, pool)", re.compile(r"sqlalchemy/")),
    ("logging (structlog)", re.compile(r"structlog/|logging/")),
    ("validation/serialisation (pydantic, apiflask, json)", re.compile(r"pydantic|apiflask/|json/|marshmallow")),
    ("flask/werkzeug", re.compile(r"flask/|werkzeug/")),
    ("fractal (own code)", re.compile(r"fractal/")),
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """ "func (path/to/site-packages/pkg/mod.py:12)" -> "func (pkg/mod.py)"."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "lib/python3.11/", str(h.ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match.group('func')} ({path})"


def summarise(raw: Path, top: int) -> list[str]:
    """Inclusive/self shares of functions and bucket shares over the samples taken inside a request."""
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit() or REQUEST_FRAME not in stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        start = next(i for i, frame in enumerate(frames) if REQUEST_FRAME in frame)
        frames = [_short(frame) for frame in frames[start:]]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        self_time[frames[-1]] += count
        bucket = "other"
        for frame in reversed(frames):
            hit = next((name for name, rule in BUCKETS if rule.search(frame)), None)
            if hit:
                bucket = hit
                break
        buckets[bucket] += count
    if not total:
        return ["no samples inside a request (is py-spy allowed to attach? try as root)"]
    out = [f"{total} samples inside requests", "", "by bucket (leaf-most match):"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in buckets.most_common()]
    out += ["", f"top {top} by inclusive share:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    out += ["", f"top {top} by self share:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in self_time.most_common(top)]
    return out


def count_round_trips(
    url: str, keypair: DevKeyPair, tokens: list[str], body: str, *, idempotency_keys: bool = False
) -> list[str]:
    """In-process: what one assign sends to Postgres and Redis, counted at the drivers.

    ``idempotency_keys``: every assign carries a fresh Idempotency-Key. The hot path runs its statement on the raw
    DBAPI connection (``run_in_own_transaction``), out of sight of SQLAlchemy's events, so Postgres round trips are
    counted on psycopg2's connections and cursors: each ``execute`` is one (a query string of several statements
    too), plus the ``BEGIN`` psycopg2 sends first when a statement opens a transaction outside autocommit, plus each
    ``commit``/``rollback`` that ends an open transaction.
    """
    import psycopg2.extensions
    import redis.connection
    from sqlalchemy import event

    from fractal.blueprints import PUBLIC_BLUEPRINTS
    from fractal.config import Settings
    from fractal.factory import create_app
    from fractal.web import EXTENSION_KEY

    settings = Settings(
        database_url=url,
        redis_url=h.REDIS_SERVER_URL,
        redis_prefix=f"fractal-bench-count-{uuid.uuid4().hex[:8]}:",
        env="test",
        jwt_public_key=keypair.public_pem,
        assign_rate_limit=h.NEVER_REFUSING_RATE_LIMIT,
        max_mandelboxes_per_user=h.MAX_PER_USER,
        log_level="WARNING",
    )
    app = create_app(blueprints=PUBLIC_BLUEPRINTS, settings=settings)
    engine = app.extensions[EXTENSION_KEY].engine
    seen: Counter[str] = Counter()
    statements: Counter[str] = Counter()
    ready = psycopg2.extensions.STATUS_READY

    class CountingCursor(psycopg2.extensions.cursor):
        def execute(self, query: Any, parameters: Any = None) -> None:
            if not self.connection.autocommit and self.connection.status == ready:
                seen["postgres round trips: BEGIN (sent by psycopg2 before a transaction's first statement)"] += 1
            seen["postgres round trips: statements (one query string each)"] += 1
            statements[_abridged(str(query))] += 1
            super().execute(query, parameters)

    class CountingConnection(psycopg2.extensions.connection):
        def cursor(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("cursor_factory", CountingCursor)
            return super().cursor(*args, **kwargs)

        def commit(self) -> None:
            if self.status != ready:
                seen["postgres round trips: COMMIT (the driver's)"] += 1
            super().commit()

        def rollback(self) -> None:
            if self.status != ready:
                seen["postgres round trips: ROLLBACK (the driver's)"] += 1
            super().rollback()

    @event.listens_for(engine, "do_connect")
    def _counting_connections(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        cparams["connection_factory"] = CountingConnection

    event.listen(engine.pool, "checkout", lambda *_: seen.update(["pool checkouts"]))
    send = redis.connection.AbstractConnection.send_packed_command

    def counted_send(self: object, command: object, check_health: bool = True) -> None:
        seen["redis round trips"] += 1
        send(self, command, check_health)  # type: ignore[arg-type]

    redis.connection.AbstractConnection.send_packed_command = counted_send  # type: ignore[method-assign]
    client = app.test_client()
    n = min(50, len(tokens))
    try:
        for token in tokens[:5]:  # warm: caches filled, connections open
            client.post(
                "/mandelbox/assign",
                data=body,
                headers={"Authorization": f"Bearer {token}"},
                content_type="application/json",
            )
        seen.clear()
        statements.clear()
        for token in tokens[5 : 5 + n]:
            headers = {"Authorization": f"Bearer {token}"}
            if idempotency_keys:
                headers["Idempotency-Key"] = uuid.uuid4().hex
            answer = client.post("/mandelbox/assign", data=body, headers=headers, content_type="application/json")
            assert answer.status_code == 201, answer.get_data(as_text=True)
    finally:
        redis.connection.AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
        engine.dispose()
    kind = "with a fresh Idempotency-Key" if idempotency_keys else "without Idempotency-Key"
    out = [f"per assign {kind}, averaged over {n} in-process requests (warm):"]
    out += [f"  {count / n:5.2f}  {name}" for name, count in sorted(seen.items())]
    out += ["  statements:"] + [f"    {count / n:5.2f}  {text}" for text, count in statements.most_common()]
    return out


def _abridged(query: str, width: int = 90) -> str:
    """A query string on one line, its middle left out when long (its last statement is the one that says most)."""
    flat = " ".join(query.split())
    half = (width - 3) // 2
    return flat if len(flat) <= width else f"{flat[:half]} … {flat[-half:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=int, default=None, help="sampling time (default 20, quick 4)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--count-only", action="store_true", help="only count the round trips (no load, no py-spy)")
    args = parser.parse_args(argv)
    if args.count_only:
        return count_only()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    seconds = args.seconds or (4 if args.quick else 20)
    out_dir = h.RESULTS_DIR / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = h.Report("profile_assign", args.quick, client=h.wrk_version())
    raw = out_dir / f"assign-{report.run_id}.txt"  # one file per mode beside it

    with h.workdir("profile") as work, h.bench_database("profile") as url:
        with h.connect(url) as connection:
            h.seed_images(connection)
            h.seed_instances(connection, first=0, count=100)
        h.vacuum_analyze(url)
        keypair = h.new_keypair()
        tokens = h.mint_user_tokens(keypair, 500)
        body = h.assign_body()
        assign_file = h.write_request_file(work, "assign.tsv", ((t, body) for t in tokens))
        with h.gunicorn(app="app:app", database_url=url, keypair=keypair, workdir=work) as server:

            def load(duration: float) -> h.LoadResult:
                return h.run_wrk(
                    server,
                    method="POST",
                    path="/mandelbox/assign",
                    request_file=assign_file,
                    duration_s=duration,
                    connections=args.connections,
                )

            load(2)  # warm-up
            raws: dict[str, Path] = {}
            for mode, flag in (("wall", "--idle"), ("cpu", "--gil")):
                raws[mode] = raw.with_name(f"{raw.stem}-{mode}.txt")
                results: list[h.LoadResult] = []
                driver = threading.Thread(target=lambda out=results: out.append(load(seconds + 2)), daemon=True)
                driver.start()
                argv_spy = [pyspy, "record", "--pid", str(server.process.pid), "--subprocesses", flag]
                argv_spy += ["--nonblocking", "--rate", "200", "--duration", str(seconds)]
                argv_spy += ["--format", "raw", "--output", str(raws[mode])]
                spy = subprocess.run(argv_spy, capture_output=True, text=True, timeout=seconds + 60, check=False)
                driver.join(timeout=seconds + 90)
                if spy.returncode != 0 or not raws[mode].exists():
                    raise SystemExit(f"py-spy failed ({spy.returncode}): {spy.stderr[-2000:]}")
                if results:
                    report.add_load(f"assign_under_profiler_{mode}", results[0])
        trips = count_round_trips(url, keypair, tokens[250:320], body)
        trips += count_round_trips(url, keypair, tokens[320:390], body, idempotency_keys=True)
    report.emit()
    print("\n" + "\n".join(trips))
    titles = {
        "wall": "wall clock (py-spy --idle: waits on Postgres/Redis and on the GIL count where they happen)",
        "cpu": "CPU (py-spy --gil: only the thread holding the GIL is sampled)",
    }
    for mode, path in raws.items():
        print(f"\n=== profile of POST /mandelbox/assign, {titles[mode]}, {seconds}s; raw stacks: {path}")
        print("\n".join(summarise(path, args.top)))
    return 0


def count_only() -> int:
    with h.bench_database("profile") as url:
        with h.connect(url) as connection:
            h.seed_images(connection)
            h.seed_instances(connection, first=0, count=100)
        keypair = h.new_keypair()
        tokens = h.mint_user_tokens(keypair, 140)
        body = h.assign_body()
        trips = count_round_trips(url, keypair, tokens[:70], body)
        trips += count_round_trips(url, keypair, tokens[70:], body, idempotency_keys=True)
    print("\n".join(trips))
    return 0


if __name__ == "__main__":
    h.run_main(main)
