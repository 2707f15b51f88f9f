"""The project against a naive implementation of the same work, in one run, phases interleaved.

    python bench/yardsticks.py [--quick] [--seconds N] [--rounds N] [--phases bare,healthz,...]

Three gunicorns with the same gunicorn.conf.py: the public API (app:app), the host API (host_service_app:app) and
the naive reference (bench/reference_app.py: a bare Flask hello, an assign and a heartbeat with pyjwt and
psycopg2 on tables of its own, no Redis). One wrk script (bench/requests.lua: every line one whole request), 16
keep-alive connections. Each round drives, in turn (the order of each pair flips every round, so neither side is
favoured by what ran just before it):

    bare GET /hello | GET /healthz | reference POST /assign | POST /mandelbox/assign | floor POST /assign-floor |
    reference POST /heartbeat | POST /host/heartbeat | heartbeat floor POST /heartbeat-floor

The floor is the reference's own assign done as cheaply as this stack (Flask, pyjwt RS256, psycopg2) allows: one
round trip, one autocommit statement. floor / reference says what share of the 1.5x target is reachable at all on
this stack, whatever the project does; assign / floor is how close the project gets to it. The heartbeat floor is
the same for the reference's heartbeat (the secret's lookup and the upsert in one autocommit statement).

Honest load: every assign request carries a token the server has never seen (minted in advance, one per request
and a fresh user each, more than the phase can send; lines a phase had to reuse are reported and must be 0), so
the verified-token cache helps only as much as in production; half of the assigns carry a fresh Idempotency-Key.
Heartbeats rotate 1,000 hosts' secrets, each host reporting its 2 RUNNING mandelboxes and a few metrics. Then,
measured separately:

- scarce: assigns to a region with 8 slots in all, so nearly every answer is 503 NO_INSTANCE_AVAILABLE (the
  refusal path: its audit event and the scaler nudge), on both apps;
- mixed: the public API gets assigns and DELETEs of seeded mandelboxes (2:1) while the host API gets heartbeats,
  both at once (10 + 6 connections).

``--phases`` runs only the phases named (of bare, healthz, ref_assign, assign, floor, ref_heartbeat, heartbeat,
heartbeat_floor, scarce, mixed; default all), with their warm-ups, interleaved as above; only the ratios and targets
whose phases ran are reported (e.g. ``--phases bare,healthz`` for the healthz target alone, a minute or two, no
tokens minted).

Figures: req/s, p50 and p99 of each phase (rates summed over rounds; latencies the mean over rounds), the ratios
against the targets of issue 15, non-2xx answers, the RSS of every worker afterwards.
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text

from bench import harness as h
from bench import reference_app
from bench.heartbeats import LIVE_PER_HOST, heartbeat_body
from fractal.auth.dev_keys import DevKeyPair, mint_token

SCRIPT = h.BENCH_DIR / "requests.lua"
HOSTS = 1000
SCARCE_REGION = "bench-scarce-01"
SCARCE_INSTANCES = 4
SCARCE_CAPACITY = 2
DELETABLE = 20_000
# Tokens minted per second of an assign phase: above any rate this stack reaches on 2 cores (the reference and the
# floor reach ~1,100 on a quiet machine; reuse is reported).
TOKENS_PER_S = 2500
TOKENS_PER_S_QUICK = 2000  # the floor reaches ~1,300 req/s in a quick phase on a quiet machine
WRK_THREADS = 2
# The phases of the interleaved rounds (in the table's order), then the two measured separately.
ROUND_PHASES = (
    "bare",
    "healthz",
    "ref_assign",
    "assign",
    "floor",
    "ref_heartbeat",
    "heartbeat",
    "heartbeat_floor",
)
PHASES = (*ROUND_PHASES, "scarce", "mixed")
# Phases that send assigns, so need the minted tokens.
_ASSIGN_PHASES = frozenset({"ref_assign", "assign", "floor", "scarce", "mixed"})

Line = tuple[str, str, str, str, str]  # method, path, bearer, idempotency key, body


@dataclass(frozen=True)
class Phase:
    name: str
    server: str  # "public", "host" or "reference"
    lines: int  # distinct requests in its file
    file: Path


def _mint_batch(args: tuple[str, Sequence[str]]) -> list[str]:
    private_pem, users = args
    return [mint_token(private_pem, user_id=user, ttl_s=4 * 3600) for user in users]


def mint_tokens(keypair: DevKeyPair, users: Sequence[str]) -> list[str]:
    """One RS256 token per user, minted on every core (RSA signing is ~1 ms each)."""
    chunk = 2000
    batches = [(keypair.private_pem, users[i : i + chunk]) for i in range(0, len(users), chunk)]
    with ProcessPoolExecutor(max_workers=2) as pool:
        return [token for batch in pool.map(_mint_batch, batches) for token in batch]


def write_lines(directory: Path, name: str, lines: Iterable[Line]) -> tuple[Path, int]:
    path = directory / f"{name}.tsv"
    count = 0
    with path.open("w") as handle:
        for fields in lines:
            if any("\t" in f or "\n" in f for f in fields):
                raise ValueError("request fields must be single-line and tab-free")
            handle.write("\t".join(fields) + "\n")
            count += 1
    return path, count


def assign_lines(tokens: Sequence[str], body: str, *, path: str, tag: str) -> Iterator[Line]:
    """Every other assign carries a fresh Idempotency-Key."""
    for n, token in enumerate(tokens):
        key = f"{tag}-{n}-{uuid.uuid4().hex[:8]}" if n % 2 == 0 else ""
        yield ("POST", path, token, key, body)


def deletable_id(n: int) -> uuid.UUID:
    return uuid.UUID(hashlib.md5(f"bench-del-{n}".encode()).hexdigest())


def seed_deletable(url: str, count: int) -> None:
    """``count`` RUNNING mandelboxes of users bench-del-user-<n> on the first 100 instances (live counts in step)."""
    with h.connect(url) as connection:
        connection.execute(
            text(
                """
                INSERT INTO mandelboxes (mandelbox_id, instance_name, user_id, session_id, status,
                                         created_at, status_changed_at)
                SELECT md5('bench-del-' || n)::uuid, 'bench-i-' || lpad((n % 100)::text, 6, '0'),
                       'bench-del-user-' || n, NULL, 'RUNNING', now(), now()
                FROM generate_series(0, CAST(:count AS int) - 1) AS n
                """
            ),
            {"count": count},
        )
        connection.execute(
            text(
                """
                UPDATE instances i SET live_mandelboxes = i.live_mandelboxes + c.n, empty_since = NULL
                FROM (SELECT instance_name, count(*) AS n FROM mandelboxes
                      WHERE user_id LIKE 'bench-del-user-%' GROUP BY instance_name) c
                WHERE c.instance_name = i.instance_name
                """
            )
        )
        connection.commit()


def seed(url: str) -> None:
    with h.connect(url) as connection:
        h.seed_images(connection)
        h.seed_instances(connection, first=0, count=HOSTS)
        h.seed_live_mandelboxes(connection, instances=HOSTS, per_instance=LIVE_PER_HOST)
        h.seed_images(connection, regions=[SCARCE_REGION], capacity=SCARCE_CAPACITY)
        h.seed_instances(
            connection, first=HOSTS, count=SCARCE_INSTANCES, regions=[SCARCE_REGION], capacity=SCARCE_CAPACITY
        )
        connection.exec_driver_sql(reference_app.SCHEMA_SQL)
        connection.exec_driver_sql(reference_app.COPY_INSTANCES_SQL)
        connection.commit()


@dataclass
class Totals:
    """A phase's load runs over the rounds."""

    runs: list[h.LoadResult]

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.runs)

    @property
    def rate(self) -> float:
        seconds = sum(r.duration_s for r in self.runs)
        return self.requests / seconds if seconds else 0.0

    @property
    def p50(self) -> float:
        return statistics.fmean(r.p50_ms for r in self.runs)

    @property
    def p99(self) -> float:
        return statistics.fmean(r.p99_ms for r in self.runs)

    @property
    def non_2xx(self) -> int:
        return sum(r.errors_status + r.errors_socket for r in self.runs)


def main(argv: list[str] | None = None) -> int:
    parser = h.load_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=None, help="seconds per phase (default 15; quick 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; quick 1)")
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated phases to run (default all: {','.join(PHASES)})"
    )
    args = parser.parse_args(argv)
    selected = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(PHASES))
    if unknown or not selected:
        parser.error(f"--phases: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(PHASES)}")
    wanted = frozenset(selected)
    # The setting (2 workers x 4 threads per server), not the config's 2 x cores + 1: three servers of five
    # workers each, every worker with its pool, would need more than a default Postgres's 100 connections.
    args.workers = args.workers or 2
    quick = args.quick
    seconds = args.seconds or (2.0 if quick else 15.0)
    rounds = args.rounds or (1 if quick else 2)
    warm_s = 1.0 if quick else 3.0
    per_s = TOKENS_PER_S_QUICK if quick else TOKENS_PER_S
    report = h.Report("yardsticks", quick, client=h.wrk_version())
    connections = args.connections

    with h.workdir("yardsticks") as work, h.bench_database("yardsticks") as url:
        h.log(f"seeding {HOSTS} instances ({LIVE_PER_HOST} live mandelboxes each), a scarce region, reference tables")
        seed(url)
        seed_deletable(url, DELETABLE)
        h.vacuum_analyze(url)
        keypair = h.new_keypair()
        body = h.assign_body()
        scarce_body = h.assign_body(regions=[SCARCE_REGION])

        # Token budget: one fresh user and token per assign the project can send, per phase and round.
        per_phase = int(per_s * seconds) if wanted & _ASSIGN_PHASES else 0
        mixed_assigns = per_phase
        budget = {
            "warm": 200,
            **{f"assign_r{r}": per_phase for r in range(rounds)},
            "scarce": int(per_s * seconds * 2),
            "mixed": mixed_assigns,
        }
        users = [f"bench-user-{name}-{n}" for name, count in budget.items() for n in range(count)]
        h.log(f"minting {len(users)} RS256 tokens (one per request, each for a new user)")
        tokens = mint_tokens(keypair, users)
        by_phase: dict[str, list[str]] = {}
        start = 0
        for name, count in budget.items():
            by_phase[name] = tokens[start : start + count]
            start += count

        files: dict[str, tuple[Path, int]] = {}
        files["hello"] = write_lines(work, "hello", (("GET", "/hello", "", "", "") for _ in range(64)))
        files["healthz"] = write_lines(work, "healthz", (("GET", "/healthz", "", "", "") for _ in range(64)))
        files["warm_public"] = write_lines(
            work, "warm_public", assign_lines(by_phase["warm"], body, path="/mandelbox/assign", tag="warm")
        )
        files["warm_reference"] = write_lines(
            work, "warm_reference", assign_lines(by_phase["warm"], body, path="/assign", tag="warm")
        )
        files["warm_floor"] = write_lines(
            work, "warm_floor", assign_lines(by_phase["warm"], body, path="/assign-floor", tag="warm")
        )
        for r in range(rounds):
            mine = by_phase[f"assign_r{r}"]
            files[f"assign_r{r}"] = write_lines(
                work, f"assign_r{r}", assign_lines(mine, body, path="/mandelbox/assign", tag=f"r{r}")
            )
            # The reference caches nothing, so it may send the same tokens (on its own tables) without gaining.
            files[f"ref_assign_r{r}"] = write_lines(
                work, f"ref_assign_r{r}", assign_lines(mine, body, path="/assign", tag=f"r{r}")
            )
            files[f"floor_r{r}"] = write_lines(
                work, f"floor_r{r}", assign_lines(mine, body, path="/assign-floor", tag=f"r{r}")
            )
        half = len(by_phase["scarce"]) // 2
        files["scarce"] = write_lines(
            work,
            "scarce",
            assign_lines(by_phase["scarce"][:half], scarce_body, path="/mandelbox/assign", tag="scarce"),
        )
        files["ref_scarce"] = write_lines(
            work, "ref_scarce", assign_lines(by_phase["scarce"][half:], scarce_body, path="/assign", tag="scarce")
        )
        beats = [(h.host_secret(n), heartbeat_body(n)) for n in range(HOSTS)]
        files["heartbeat"] = write_lines(work, "heartbeat", (("POST", "/host/heartbeat", s, "", b) for s, b in beats))
        files["ref_heartbeat"] = write_lines(
            work, "ref_heartbeat", (("POST", "/heartbeat", s, "", b) for s, b in beats)
        )
        files["heartbeat_floor"] = write_lines(
            work, "heartbeat_floor", (("POST", "/heartbeat-floor", s, "", b) for s, b in beats)
        )
        delete_tokens = mint_tokens(keypair, [f"bench-del-user-{n}" for n in range(min(DELETABLE, per_phase))])

        def mixed() -> Iterator[Line]:
            assigns = assign_lines(by_phase["mixed"], body, path="/mandelbox/assign", tag="mixed")
            for n, token in enumerate(delete_tokens):
                for _ in range(2):
                    line = next(assigns, None)
                    if line is not None:
                        yield line
                yield ("DELETE", f"/mandelbox/{deletable_id(n)}", token, "", "")

        files["mixed_public"] = write_lines(work, "mixed_public", mixed())

        with (
            h.gunicorn(app="app:app", database_url=url, keypair=keypair, workdir=work, workers=args.workers) as public,
            h.gunicorn(
                app="host_service_app:app", database_url=url, keypair=keypair, workdir=work, workers=args.workers
            ) as host,
            h.gunicorn(
                app="bench.reference_app:app", database_url=url, keypair=keypair, workdir=work, workers=args.workers
            ) as reference,
        ):
            servers = {"public": public, "host": host, "reference": reference}
            report.add("workers", len(public.worker_pids()), "processes per server", config=public.config)

            cpu: dict[str, list[tuple[float, float, int]]] = {}

            def load(
                server: str, file: str, duration: float, conns: int = connections, phase: str | None = None
            ) -> h.LoadResult:
                # CPU per request of the server's workers and of the database's backends: unlike req/s, hardly
                # moved by what else runs on the machine.
                workers = servers[server].worker_pids()
                app_before = h.cpu_seconds(workers)
                backends = h.database_backend_pids(url)
                db_before = h.cpu_seconds(backends)
                result = h.finish_wrk(start(server, file, duration, conns))
                app_cpu = h.cpu_seconds(workers) - app_before
                db_cpu = h.cpu_seconds(backends) - db_before
                if phase is not None:
                    cpu.setdefault(phase, []).append((app_cpu, db_cpu, result.requests))
                lines = files[file][1]
                if file.startswith(("assign", "floor", "scarce", "mixed")) and result.requests > lines:
                    report.notes.append(f"WARN {file}: {result.requests} requests for {lines} distinct tokens")
                return result

            def start(server: str, file: str, duration: float, conns: int) -> h.WrkRun:
                path, _ = files[file]
                return h.start_wrk(
                    servers[server],
                    script=SCRIPT,
                    script_args=[str(path), str(WRK_THREADS)],
                    duration_s=duration,
                    connections=conns,
                    threads=WRK_THREADS,
                )

            h.log("warming up")
            warm_ups = {
                "bare": [("reference", "hello")],
                "healthz": [("public", "healthz")],
                "ref_assign": [("reference", "warm_reference")],
                "floor": [("reference", "warm_floor")],
                "assign": [("public", "warm_public")],
                "scarce": [("reference", "warm_reference"), ("public", "warm_public")],
                "mixed": [("public", "warm_public"), ("host", "heartbeat")],
                "ref_heartbeat": [("reference", "ref_heartbeat")],
                "heartbeat_floor": [("reference", "heartbeat_floor")],
                "heartbeat": [("host", "heartbeat")],
            }
            warmed: set[tuple[str, str]] = set()
            for name in PHASES:
                for warm_up in warm_ups[name] if name in wanted else ():
                    if warm_up not in warmed:
                        warmed.add(warm_up)
                        load(*warm_up, warm_s)

            results: dict[str, list[h.LoadResult]] = {}
            pairs: list[tuple[tuple[str, str, str], ...]] = [
                (("bare", "reference", "hello"), ("healthz", "public", "healthz")),
                (
                    ("ref_assign", "reference", "ref_assign_r{r}"),
                    ("assign", "public", "assign_r{r}"),
                    ("floor", "reference", "floor_r{r}"),
                ),
                (
                    ("ref_heartbeat", "reference", "ref_heartbeat"),
                    ("heartbeat", "host", "heartbeat"),
                    ("heartbeat_floor", "reference", "heartbeat_floor"),
                ),
            ]
            pairs = [tuple(phase for phase in pair if phase[0] in wanted) for pair in pairs]
            for r in range(rounds):
                for pair in pairs:
                    for name, server, file in pair if r % 2 == 0 else tuple(reversed(pair)):
                        h.log(f"round {r + 1}/{rounds}: {name} for {seconds:g}s")
                        results.setdefault(name, []).append(load(server, file.format(r=r), seconds, phase=name))

            ref_scarce = scarce = mixed_public_result = mixed_host_result = None
            if "scarce" in wanted:
                h.log(f"scarce capacity ({SCARCE_INSTANCES * SCARCE_CAPACITY} slots), reference then project")
                ref_scarce = load("reference", "ref_scarce", seconds, phase="ref_scarce")
                scarce = load("public", "scarce", seconds, phase="scarce")

            if "mixed" in wanted:
                h.log(f"mixed: assigns + deletes on the public API, heartbeats on the host API, {seconds:g}s")
                public_conns = max(1, connections * 10 // 16)
                mixed_public = start("public", "mixed_public", seconds, public_conns)
                mixed_host = start("host", "heartbeat", seconds, max(1, connections - public_conns))
                mixed_public_result = h.finish_wrk(mixed_public)
                mixed_host_result = h.finish_wrk(mixed_host)

            rss = {
                f"{name}_{n}": h.rss_kib(pid) / 1024
                for name, server in servers.items()
                for n, pid in enumerate(server.worker_pids())
            }

    totals = {name: Totals(runs) for name, runs in results.items()}
    table: list[tuple[str, Totals]] = [(name, totals[name]) for name in ROUND_PHASES if name in totals]
    if ref_scarce is not None and scarce is not None:
        table += [("ref_scarce", Totals([ref_scarce])), ("scarce", Totals([scarce]))]
    if mixed_public_result is not None and mixed_host_result is not None:
        table += [("mixed_public", Totals([mixed_public_result])), ("mixed_heartbeat", Totals([mixed_host_result]))]
    for name, total in table:
        report.add(f"{name}_rate", total.rate, "req/s", requests=total.requests, rounds=len(total.runs))
        report.add(f"{name}_p50", total.p50, "ms")
        report.add(f"{name}_p99", total.p99, "ms")
        report.add(f"{name}_non_2xx", total.non_2xx, "requests")
    cpu_ms: dict[str, tuple[float, float]] = {}
    for name, samples in cpu.items():
        served = sum(n for _, _, n in samples) or 1
        cpu_ms[name] = (
            1000 * sum(a for a, _, _ in samples) / served,
            1000 * sum(d for _, d, _ in samples) / served,
        )
        report.add(f"{name}_cpu_ms", cpu_ms[name][0], "ms of worker CPU per request")
        report.add(f"{name}_db_cpu_ms", cpu_ms[name][1], "ms of Postgres backend CPU per request")
    for name, result in (("ref_scarce", ref_scarce), ("scarce", scarce)):
        if result is not None:
            report.add(f"{name}_503", result.status_503, "requests")
            report.add(f"{name}_2xx", result.status_2xx, "requests")

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    t = totals
    rates = {name: total.rate for name, total in table}
    p99s = {name: total.p99 for name, total in table}
    app_cpu = {name: ms[0] for name, ms in cpu_ms.items()}
    # (ratio, figures, numerator, denominator): reported when both phases ran.
    wanted_ratios: list[tuple[str, dict[str, float], str, str]] = [
        ("healthz_to_bare", rates, "healthz", "bare"),
        ("assign_to_ref", rates, "assign", "ref_assign"),
        ("assign_p99_to_ref", p99s, "assign", "ref_assign"),
        ("heartbeat_to_ref", rates, "heartbeat", "ref_heartbeat"),
        # What this stack allows at all: the floor does the reference's work in one round trip.
        ("floor_to_ref", rates, "floor", "ref_assign"),
        ("floor_p99_to_ref", p99s, "floor", "ref_assign"),
        ("assign_to_floor", rates, "assign", "floor"),
        ("floor_cpu_to_ref", app_cpu, "floor", "ref_assign"),
        ("heartbeat_floor_to_ref", rates, "heartbeat_floor", "ref_heartbeat"),
        ("heartbeat_to_floor", rates, "heartbeat", "heartbeat_floor"),
        ("heartbeat_floor_cpu_to_ref", app_cpu, "heartbeat_floor", "ref_heartbeat"),
        ("scarce_to_ref", rates, "scarce", "ref_scarce"),
        ("assign_cpu_to_ref", app_cpu, "assign", "ref_assign"),
        ("heartbeat_cpu_to_ref", app_cpu, "heartbeat", "ref_heartbeat"),
        ("healthz_cpu_to_bare", app_cpu, "healthz", "bare"),
    ]
    ratios = {
        name: ratio(figures[a], figures[b]) for name, figures, a, b in wanted_ratios if a in figures and b in figures
    }
    for name, value in ratios.items():
        report.add(name, value, "ratio")
    project_rss = [v for k, v in rss.items() if not k.startswith("reference")]
    for name, mib in sorted(rss.items()):
        report.add(f"rss_{name}", mib, "MiB")
    report.add("rss_worker_max", max(project_rss), "MiB")

    for name, passed, goal in (
        ("assign_to_ref", lambda v: v >= 1.5, ">= 1.5"),
        ("assign_p99_to_ref", lambda v: v <= 0.7, "<= 0.7"),
        ("heartbeat_to_ref", lambda v: v >= 1.5, ">= 1.5"),
        ("healthz_to_bare", lambda v: v >= 0.9, ">= 0.9"),
    ):
        if name in ratios:
            report.target(name, passed(ratios[name]), goal)
    report.target("rss_worker_max", max(project_rss) <= 120, "<= 120 MiB")
    non_2xx = sum(t[name].non_2xx for name in ("healthz", "assign", "heartbeat") if name in t)
    non_2xx += mixed_host_result.errors_status if mixed_host_result is not None else 0
    report.target("project non-2xx outside the scarce phase", non_2xx == 0, "0")

    print_table(table, ratios, cpu_ms, quick=quick, seconds=seconds, rounds=rounds)
    report.emit()
    return 0


def print_table(
    table: Sequence[tuple[str, Totals]],
    ratios: dict[str, float],
    cpu_ms: dict[str, tuple[float, float]],
    *,
    quick: bool,
    seconds: float,
    rounds: int,
) -> None:
    print(f"\n== yardsticks ({'quick' if quick else 'full'}: {rounds} round(s) x {seconds:g}s per phase)")
    header = f"{'phase':<16} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}"
    print(f"  {header} {'app CPU ms':>10} {'db CPU ms':>9}")
    for name, total in table:
        app, db = cpu_ms.get(name, (float("nan"), float("nan")))
        print(
            f"  {name:<16} {total.rate:>9,.1f} {total.p50:>8.1f} {total.p99:>8.1f} {total.non_2xx:>8,}"
            f" {app:>10.2f} {db:>9.2f}"
        )
    for name, value in ratios.items():
        print(f"  {name:<24} {value:6.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    h.run_main(main)
