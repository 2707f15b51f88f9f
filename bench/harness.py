"""Shared pieces of the benchmarks: a fresh migrated database, set-based seeding, gunicorn, wrk, reporting.

Everything a bench starts binds 127.0.0.1 on a free port, is bounded in time and is stopped by pid at the end
(also on Ctrl-C or SIGTERM); the database it created is dropped and its Redis keys deleted.

Servers: Postgres at FRACTAL_TEST_PG_URL (default postgresql://postgres@127.0.0.1:5432/test; a database is
created beside it), Redis at FRACTAL_TEST_REDIS_URL (default redis://127.0.0.1:6379/0; keys under a unique
prefix). `./commands bench` finds or starts both, like `./commands test`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from sqlalchemy import Connection, create_engine, text

from fractal.auth.dev_keys import DevKeyPair, generate_keypair, mint_token
from fractal.auth.hosts import hash_host_secret
from fractal.config import normalise_database_url
from test.throwaway import free_port, throwaway_database

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"
LUA_SCRIPT = BENCH_DIR / "rotate.lua"
REDIS_SERVER_URL = os.environ.get("FRACTAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

COMMIT = "bench-commit-0001"
OTHER_COMMIT = "bench-commit-0000"
REGIONS = tuple(f"bench-region-{n:02d}" for n in range(20))
# Room enough that no run ever fills the fleet: 100 instances x 100,000 slots.
BIG_CAPACITY = 100_000
# Limiting stays ON (the Redis counters are incremented on every assign) but never refuses.
NEVER_REFUSING_RATE_LIMIT = "100000000 per minute"
MAX_PER_USER = 1_000_000
READY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20


# --- signals -------------------------------------------------------------------------------------------


def load_parser(
    doc: str | None, *, quick_help: str = "short smoke run (seconds, not minutes)"
) -> argparse.ArgumentParser:
    """The options every load benchmark takes: --quick, --connections, --workers."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None, help="gunicorn workers (default: the config's)")
    return parser


def run_main(main: Callable[[], int]) -> NoReturn:
    """Run a benchmark's main: servers are stopped and the database dropped on Ctrl-C and SIGTERM too."""
    exit_cleanly_on_sigterm()
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; servers stopped and database dropped")
        sys.exit(130)


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C: the finally blocks stop gunicorn and drop the database."""

    def _raise(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


# --- database ------------------------------------------------------------------------------------------


@contextmanager
def bench_database(bench: str) -> Iterator[str]:
    """A fresh database on the FRACTAL_TEST_PG_URL server, migrated; dropped afterwards. Yields its URL."""
    with throwaway_database(f"fractal_bench_{bench}") as url:
        yield url


@contextmanager
def connect(url: str) -> Iterator[Connection]:
    """One connection; the caller commits."""
    engine = create_engine(normalise_database_url(url))
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


# --- seeding (set-based: generate_series, never a Python loop per row) ----------------------------------


def host_secret(n: int) -> str:
    """The known secret of seeded instance number ``n`` (benchmarks drive the host API with it)."""
    return f"bench-host-secret-{n:06d}"


def instance_name(n: int) -> str:
    return f"bench-i-{n:06d}"


def seed_images(connection: Connection, *, regions: Sequence[str] = REGIONS, capacity: int = BIG_CAPACITY) -> None:
    """An active image for COMMIT and for OTHER_COMMIT in every region."""
    connection.execute(
        text(
            """
            INSERT INTO images (region, client_commit_hash, ami_id, active, instance_type, mandelbox_capacity)
            SELECT region, commit_hash, 'ami-bench', true, 'g4dn.xlarge', :capacity
            FROM unnest(CAST(:regions AS text[])) AS region,
                 unnest(CAST(:commits AS text[])) AS commit_hash
            """
        ),
        {"regions": list(regions), "commits": [COMMIT, OTHER_COMMIT], "capacity": capacity},
    )
    connection.commit()


def seed_instances(
    connection: Connection,
    *,
    first: int,
    count: int,
    regions: Sequence[str] = REGIONS,
    capacity: int = BIG_CAPACITY,
    other_commit_every: int = 0,
    status: str = "ACTIVE",
) -> None:
    """Instances ``first`` .. ``first + count - 1``, round-robin over ``regions``, with known host secrets.

    ``other_commit_every=k`` puts every k-th instance on OTHER_COMMIT (a fleet mid roll-out); 0: none.
    """
    connection.execute(
        text(
            """
            INSERT INTO instances (instance_name, region, client_commit_hash, ami_id, instance_type, ip,
                                   mandelbox_capacity, live_mandelboxes, status, host_secret_hash,
                                   created_at, status_changed_at, empty_since)
            SELECT 'bench-i-' || lpad(n::text, 6, '0'),
                   (CAST(:regions AS text[]))[1 + (n % :nregions)],
                   CASE WHEN :every > 0 AND n % :every = 0 THEN :other ELSE :commit END,
                   'ami-bench', 'g4dn.xlarge',
                   '10.' || (n / 65536) % 256 || '.' || (n / 256) % 256 || '.' || n % 256,
                   :capacity, 0, :status,
                   encode(sha256(convert_to('bench-host-secret-' || lpad(n::text, 6, '0'), 'UTF8')), 'hex'),
                   now(), now(), now()
            FROM generate_series(CAST(:first AS int), CAST(:last AS int)) AS n
            """
        ),
        {
            "regions": list(regions),
            "nregions": len(regions),
            "every": other_commit_every,
            "other": OTHER_COMMIT,
            "commit": COMMIT,
            "capacity": capacity,
            "status": status,
            "first": first,
            "last": first + count - 1,
        },
    )
    connection.commit()
    # The SQL above must hash exactly as the host API does, or every host request would be a 401.
    stored = connection.execute(
        text("SELECT host_secret_hash FROM instances WHERE instance_name = :name"), {"name": instance_name(first)}
    ).scalar_one()
    assert stored == hash_host_secret(host_secret(first)), "seeded host secret hash differs from hash_host_secret"


def seed_exited_mandelboxes(
    connection: Connection, *, count: int, instances: int, users: int, first_instance: int = 0
) -> None:
    """``count`` EXITED mandelboxes (history) spread over ``instances`` instances and ``users`` user ids."""
    connection.execute(
        text(
            """
            INSERT INTO mandelboxes (mandelbox_id, instance_name, user_id, session_id, status,
                                     created_at, status_changed_at, ended_at, end_reason)
            SELECT md5('bench-mb-' || n)::uuid,
                   'bench-i-' || lpad((:first_instance + n % :instances)::text, 6, '0'),
                   'bench-user-' || (n % :users),
                   NULL, 'EXITED',
                   now() - make_interval(secs => n), now() - make_interval(secs => n),
                   now() - make_interval(secs => n) + interval '30 minutes', 'HOST_EXITED'
            FROM generate_series(1, CAST(:count AS int)) AS n
            """
        ),
        {"count": count, "instances": instances, "users": users, "first_instance": first_instance},
    )
    connection.commit()


def live_mandelbox_id(instance: int, k: int) -> uuid.UUID:
    """The id of seeded live mandelbox ``k`` on instance ``instance`` (md5-derived, as the SQL below does)."""
    return uuid.UUID(hashlib.md5(f"bench-live-{instance}-{k}".encode()).hexdigest())


def seed_live_mandelboxes(
    connection: Connection, *, instances: int, per_instance: int, status: str = "RUNNING"
) -> None:
    """``per_instance`` live mandelboxes on each of instances 0 .. ``instances - 1`` (live counts kept in step)."""
    connection.execute(
        text(
            """
            INSERT INTO mandelboxes (mandelbox_id, instance_name, user_id, session_id, status,
                                     created_at, status_changed_at)
            SELECT md5('bench-live-' || i || '-' || k)::uuid, 'bench-i-' || lpad(i::text, 6, '0'),
                   'bench-host-user-' || i || '-' || k, NULL, :status, now(), now()
            FROM generate_series(0, CAST(:instances AS int) - 1) AS i, generate_series(0, CAST(:per AS int) - 1) AS k
            """
        ),
        {"instances": instances, "per": per_instance, "status": status},
    )
    connection.execute(
        text("UPDATE instances SET live_mandelboxes = :per, empty_since = NULL WHERE instance_name < :bound"),
        {"per": per_instance, "bound": instance_name(instances)},
    )
    connection.commit()


def vacuum_analyze(url: str) -> None:
    """Fresh planner statistics after bulk seeding (what autovacuum would give a real table)."""
    engine = create_engine(normalise_database_url(url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text("VACUUM ANALYZE"))
    finally:
        engine.dispose()


def count_rows(url: str, table: str) -> int:
    with connect(url) as connection:
        return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


# --- tokens and request files --------------------------------------------------------------------------


def user_id(n: int) -> str:
    return f"bench-user-{n}"


def mint_user_tokens(keypair: DevKeyPair, users: int, *, ttl_s: int = 4 * 3600) -> list[str]:
    """One RS256 token per distinct user (signed by the run's own key)."""
    return [mint_token(keypair.private_pem, user_id=user_id(n), ttl_s=ttl_s) for n in range(users)]


def write_request_file(directory: Path, name: str, rows: Iterable[tuple[str, str]]) -> Path:
    """Lines of "<credential>\\t<body>" for bench/rotate.lua."""
    path = directory / name
    with path.open("w") as handle:
        for credential, body in rows:
            if "\t" in credential or "\n" in credential or "\n" in body:
                raise ValueError("credentials and bodies must be single-line and tab-free")
            handle.write(f"{credential}\t{body}\n")
    return path


# --- gunicorn ------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A gunicorn master on 127.0.0.1:port and where its log goes."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    config: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        """The master's children (gunicorn workers), read from /proc."""
        children: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # Fields after the parenthesised command name: state, ppid, ...
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.process.pid:
                children.append(int(entry.name))
        return sorted(children)

    def log_tail(self, lines: int = 30) -> str:
        with suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time consumed so far by ``pids`` (those still running), from /proc/<pid>/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


def database_backend_pids(url: str) -> list[int]:
    """The Postgres backends connected to the database of ``url`` right now (pg_stat_activity), ours excluded."""
    with connect(url) as connection:
        rows = connection.execute(
            text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        ).all()
    return [int(row.pid) for row in rows]


def server_env(*, database_url: str, public_pem: str, redis_prefix: str, port: int) -> dict[str, str]:
    """The environment a benchmarked server runs with: test env, real JWT checks, limits on but never refusing."""
    # The worker model may be chosen for a run (GUNICORN_WORKER_CLASS=sync ./commands bench yardsticks); any other
    # FRACTAL_/GUNICORN_ setting of the caller's shell is left out.
    kept = ("GUNICORN_WORKER_CLASS", "GUNICORN_THREADS")
    env = {
        key: value for key, value in os.environ.items() if key in kept or not key.startswith(("FRACTAL_", "GUNICORN_"))
    }
    env.update(
        {
            "FRACTAL_ENV": "test",
            "DATABASE_URL": database_url,
            "REDIS_URL": REDIS_SERVER_URL,
            "FRACTAL_REDIS_PREFIX": redis_prefix,
            "FRACTAL_JWT_PUBLIC_KEY": public_pem,
            "FRACTAL_ASSIGN_RATE_LIMIT": NEVER_REFUSING_RATE_LIMIT,
            "FRACTAL_MAX_MANDELBOXES_PER_USER": str(MAX_PER_USER),
            "GUNICORN_BIND": f"127.0.0.1:{port}",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def gunicorn_command(app: str, port: int, workers: int | None) -> tuple[list[str], str]:
    """The gunicorn command line: the repository's gunicorn.conf.py when present, else equivalent flags."""
    conf = ROOT / "gunicorn.conf.py"
    base = [sys.executable, "-m", "gunicorn"]
    if conf.exists():
        extra = ["--workers", str(workers)] if workers else []
        shown = f"gunicorn.conf.py --workers {workers}" if workers else "gunicorn.conf.py"
        model = [
            f"{key}={os.environ[key]}" for key in ("GUNICORN_WORKER_CLASS", "GUNICORN_THREADS") if key in os.environ
        ]
        shown = " ".join([shown, *model])
        return [*base, "-c", str(conf), *extra, app], shown
    count = workers or 2 * (os.cpu_count() or 1)
    flags = [
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(count),
        "--worker-class",
        "gthread",
        "--threads",
        "4",
        "--timeout",
        "30",
        "--keep-alive",
        "5",
        "--no-control-socket",
    ]
    return [*base, *flags, app], f"flags: {count} workers x 4 gthread threads, no access log"


def _wait_ready(server: Server, deadline: float) -> None:
    last = "no answer"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
                last = f"status {answer.status}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{server.url}/readyz not ready in {READY_TIMEOUT_S}s ({last}):\n{server.log_tail()}")


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM by pid, then SIGKILL if it is still there after ``timeout_s``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def gunicorn(
    *, app: str, database_url: str, keypair: DevKeyPair, workdir: Path, workers: int | None = None
) -> Iterator[Server]:
    """Start gunicorn serving ``app`` on a free loopback port, wait for /readyz; stop it (by pid) afterwards."""
    port = free_port()
    prefix = f"fractal-bench-{uuid.uuid4().hex[:8]}:"
    env = server_env(database_url=database_url, public_pem=keypair.public_pem, redis_prefix=prefix, port=port)
    argv, config = gunicorn_command(app, port, workers)
    log_path = workdir / f"gunicorn-{port}.log"
    with log_path.open("wb") as log:
        # Its own session: a Ctrl-C in the terminal reaches only us, and we stop the master in order.
        process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(process=process, port=port, log_path=log_path, config=config)
    try:
        _wait_ready(server, time.monotonic() + READY_TIMEOUT_S)
        yield server
    finally:
        stop_process(process)
        _delete_redis_keys(prefix)


def _delete_redis_keys(prefix: str) -> None:
    """Remove what this run's server wrote to the shared Redis (rate-limit counters, cache, nudges)."""
    with suppress(Exception):
        import redis

        client = redis.Redis.from_url(REDIS_SERVER_URL, socket_connect_timeout=2, socket_timeout=5)
        batch: list[Any] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch = []
        if batch:
            client.delete(*batch)
        client.close()


# --- load (wrk) ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    """One wrk run: rates in requests per second, latencies in milliseconds.

    The status counts are filled by bench/requests.lua only (rotate.lua leaves them at -1: not counted).
    """

    requests: int
    duration_s: float
    errors_status: int
    errors_socket: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    status_2xx: int = -1
    status_429: int = -1
    status_503: int = -1
    status_other: int = -1

    @property
    def rate(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def wrk_version() -> str:
    """The load client, as reported: "wrk <version>"."""
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk; `./commands bench` installs it)")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    match = re.search(r"wrk (\S+)", out.stdout + out.stderr)
    return f"wrk {match.group(1) if match else 'unknown'}"


@dataclass
class WrkRun:
    """A wrk process started by ``start_wrk``; ``finish_wrk`` waits for it (bounded) and parses its figures."""

    process: subprocess.Popen[str]
    duration_s: float


def start_wrk(
    server: Server,
    *,
    script: Path,
    script_args: Sequence[str],
    duration_s: float,
    connections: int = 16,
    threads: int = 2,
) -> WrkRun:
    """Start wrk with ``script`` against ``server``; the script's arguments follow ``--``."""
    threads = max(1, min(threads, connections))
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        server.url,
        "--",
        *script_args,
    ]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return WrkRun(process=process, duration_s=duration_s)


def finish_wrk(run: WrkRun) -> LoadResult:
    try:
        stdout, stderr = run.process.communicate(timeout=run.duration_s + 60)
    except subprocess.TimeoutExpired:
        run.process.kill()
        run.process.communicate(timeout=10)
        raise
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if run.process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({run.process.returncode}):\n{stdout}\n{stderr}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    return LoadResult(
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        errors_status=int(data["errors_status"]),
        errors_socket=sum(int(data[k]) for k in ("errors_connect", "errors_read", "errors_write", "errors_timeout")),
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        mean_ms=data["latency_mean_us"] / 1000,
        max_ms=data["latency_max_us"] / 1000,
        status_2xx=int(data.get("status_2xx", -1)),
        status_429=int(data.get("status_429", -1)),
        status_503=int(data.get("status_503", -1)),
        status_other=int(data.get("status_other", -1)),
    )


def run_wrk(
    server: Server,
    *,
    method: str,
    path: str,
    request_file: Path,
    duration_s: float,
    connections: int = 16,
    threads: int = 2,
) -> LoadResult:
    """Drive ``method path`` for ``duration_s`` with ``connections`` keep-alive connections (bounded)."""
    threads = max(1, min(threads, connections))
    run = start_wrk(
        server,
        script=LUA_SCRIPT,
        script_args=[method, path, str(request_file), str(threads)],
        duration_s=duration_s,
        connections=connections,
        threads=threads,
    )
    return finish_wrk(run)


# --- reporting -----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


@dataclass
class Report:
    """Figures of one bench run: printed as a table and as JSON lines, appended to bench/results/<bench>.jsonl."""

    bench: str
    quick: bool
    client: str = ""
    run_id: str = field(default_factory=lambda: f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:4]}")
    figures: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: str, value: float | int | str, unit: str, **extra: Any) -> None:
        if isinstance(value, float):
            value = round(value, 3)
        self.figures.append({"bench": self.bench, "figure": figure, "value": value, "unit": unit, **extra})

    def add_load(self, prefix: str, result: LoadResult) -> None:
        """The usual figures of one load run: rate, p50, p99, non-2xx answers."""
        duration = round(result.duration_s, 2)
        self.add(f"{prefix}_rate", result.rate, "req/s", requests=result.requests, duration_s=duration)
        self.add(f"{prefix}_p50", result.p50_ms, "ms")
        self.add(f"{prefix}_p99", result.p99_ms, "ms")
        self.add(f"{prefix}_non_2xx", result.errors_status + result.errors_socket, "requests")

    def target(self, figure: str, ok: bool, wanted: str) -> None:
        """Record how a figure compares with its target (reported, never a failure)."""
        self.notes.append(f"{'MET ' if ok else 'MISS'} {figure}: target {wanted}")

    def emit(self) -> None:
        """Print the table, then one JSON line per figure; append the lines to bench/results/<bench>.jsonl."""
        mode = "quick" if self.quick else "full"
        print(f"\n== bench {self.bench} ({mode}, load client: {self.client or 'none'}, run {self.run_id})")
        width = max((len(f["figure"]) for f in self.figures), default=10)
        for fig in self.figures:
            value = fig["value"]
            shown = f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
            print(f"  {fig['figure']:<{width}}  {shown:>14}  {fig['unit']}")
        for note in self.notes:
            print(f"  {note}")
        stamp = {"run": self.run_id, "mode": mode, "client": self.client, "at": datetime.now(UTC).isoformat()}
        lines = [json.dumps({**fig, **stamp}, sort_keys=False) for fig in self.figures]
        lines.append(json.dumps({"bench": self.bench, "figure": "machine", "value": machine(), "unit": "", **stamp}))
        for line in lines:
            print(line)
        sys.stdout.flush()
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        with (RESULTS_DIR / f"{self.bench}.jsonl").open("a") as handle:
            handle.write("\n".join(lines) + "\n")


@contextmanager
def workdir(bench: str) -> Iterator[Path]:
    """A private temporary directory (request files, gunicorn log), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"fractal-bench-{bench}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def new_keypair() -> DevKeyPair:
    """The run's own RSA key pair: the server verifies tokens signed with it, as in production."""
    return generate_keypair()


def assign_body(regions: Sequence[str] = REGIONS[:2], commit: str = COMMIT) -> str:
    return json.dumps({"regions": list(regions), "client_commit_hash": commit}, separators=(",", ":"))


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# In-process benches (cpu_per_request, profile_heartbeat, profile_assign's round-trip count): the apps built by
# create_app in this process and driven through Flask's test client.


def app_settings(url: str, keypair: DevKeyPair, bench: str, **overrides: Any) -> Any:
    """The Settings an in-process bench builds its apps with: as ``server_env`` (test env, real JWT checks, limits
    on but never refusing), Redis keys under a prefix of the run's own; ``overrides`` win."""
    from fractal.config import Settings

    values: dict[str, Any] = {
        "database_url": url,
        "redis_url": REDIS_SERVER_URL,
        "redis_prefix": f"fractal-bench-{bench}-{uuid.uuid4().hex[:8]}:",
        "env": "test",
        "jwt_public_key": keypair.public_pem,
        "assign_rate_limit": NEVER_REFUSING_RATE_LIMIT,
        "max_mandelboxes_per_user": MAX_PER_USER,
    }
    values.update(overrides)
    return Settings(**values)


@contextmanager
def apps_in_process(url: str, keypair: DevKeyPair, log_path: Path) -> Iterator[None]:
    """Environment for apps built in this process (the reference app reads DATABASE_URL and the public key from
    it), and their JSON log lines (written to fd 2) sent to ``log_path`` until the block ends."""
    os.environ.update(
        {
            "DATABASE_URL": url,
            "FRACTAL_JWT_PUBLIC_KEY": keypair.public_pem,
            "FRACTAL_MAX_MANDELBOXES_PER_USER": str(MAX_PER_USER),
        }
    )
    with log_path.open("w") as log_file:
        saved_stderr = os.dup(2)
        os.dup2(log_file.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)


def expect_status(answer: Any, status: int) -> None:
    """Raise unless a test client's ``answer`` has ``status`` (a bench must not time failures)."""
    if answer.status_code != status:
        raise RuntimeError(f"{answer.status_code}: {answer.get_data(as_text=True)[:300]}")


def heartbeat_sender(client: Any, path: str, beats: Sequence[tuple[str, str]]) -> Callable[[int], None]:
    """``send(k)``: host ``k`` (modulo the fleet) posts its heartbeat body to ``path`` with its secret; 200 expected."""

    def send(k: int) -> None:
        secret, beat = beats[k % len(beats)]
        headers = {"Authorization": f"Bearer {secret}"}
        expect_status(client.post(path, data=beat, headers=headers, content_type="application/json"), 200)

    return send
