"""A long contended run: many threads assigning across a fleet while hosts heartbeat, operators drain, users delete,
hosts exit or fall silent and the sweeps mark them LOST and release unclaimed boxes; then the invariants are
checked with SQL, and Postgres is asked whether it had to break a deadlock (the fleet's one lock order says never).

Usage: .venv/bin/python bench/stress.py [--assigns 100000] [--threads 16] [--instances 40] [--capacity 8]
                                        [--users 400] [--max-per-user 2] [--seed 1]
Runs the three WSGI apps in this process (real HTTP handling, no sockets) against its own fresh database on
FRACTAL_TEST_PG_URL's server (default postgresql://postgres@127.0.0.1:5432/test), dropped afterwards (--keep keeps
it). Prints a table, then one JSON line per figure. Exits 1 when an invariant is broken.

Invariants (checked during the run by a sampler and at the end):
- no instance ever over capacity: the CHECK constraint exists, and live rows per instance ≤ capacity;
- the live-count column equals the live rows of each instance;
- every mandelbox is on exactly one existing instance, no live mandelbox on an ended instance;
- no user holds more than --max-per-user live mandelboxes;
- counts agree between tables (sum of live counts = live mandelboxes; ended rows carry ended_at and end_reason);
- Postgres detected no deadlock in the run's database (pg_stat_database.deadlocks).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `fractal` importable from a checkout
    sys.path.insert(0, str(ROOT))


from fractal.auth.dev_keys import generate_keypair, mint_token  # noqa: E402
from fractal.blueprints import BLUEPRINTS_BY_API  # noqa: E402
from fractal.config import Settings, normalise_database_url  # noqa: E402
from fractal.database import create_session_factory  # noqa: E402
from fractal.factory import create_app  # noqa: E402
from fractal.fleet.sweeps import run_sweeps  # noqa: E402
from fractal.migrations import upgrade_to_head  # noqa: E402
from test.throwaway import PG_SERVER_URL, create_database, database_name, drop_database  # noqa: E402

REGIONS = ["us-east-1", "us-west-2", "eu-west-1"]
COMMIT = "stress1"


@dataclass
class StressConfig:
    assigns: int = 100_000
    threads: int = 16
    instances: int = 40
    capacity: int = 8
    users: int = 400
    max_per_user: int = 2
    seed: int = 1
    chaos_interval_s: float = 0.2
    heartbeat_interval_s: float = 0.05
    # The sweeps run concurrently with everything else; hosts the chaos worker silences become LOST quickly.
    sweep_interval_s: float = 0.1
    host_timeout_s: float = 1.0
    connect_timeout_s: float = 2.0


@dataclass
class StressReport:
    assigns_attempted: int = 0
    duration_s: float = 0.0
    answers: Counter[str] = field(default_factory=Counter)  # "assign 201", "assign 409 USER_ALREADY_ACTIVE", ...
    drains: int = 0
    host_exits: int = 0
    silenced: int = 0
    lost: int = 0
    released: int = 0
    deadlocks: int = 0
    registrations: int = 0
    samples: int = 0
    violations: list[str] = field(default_factory=list)
    server_errors: int = 0

    @property
    def assigns_per_s(self) -> float:
        return self.assigns_attempted / self.duration_s if self.duration_s else 0.0

    def refusals(self) -> dict[str, int]:
        return {
            key.removeprefix("assign "): n
            for key, n in sorted(self.answers.items())
            if key.startswith("assign ") and not key.startswith("assign 201")
        }


# --- database -------------------------------------------------------------------------------------------------


INVARIANTS: dict[str, str] = {
    # Each query returns the offending rows; an empty result means the invariant holds.
    "capacity CHECK constraint exists": """
        SELECT 'missing' WHERE NOT EXISTS (
            SELECT 1 FROM pg_constraint WHERE conrelid = 'instances'::regclass AND contype = 'c'
              AND pg_get_constraintdef(oid) LIKE '%live_mandelboxes%mandelbox_capacity%')""",
    "no instance over capacity": """
        SELECT i.instance_name, i.mandelbox_capacity, count(m.mandelbox_id)
        FROM instances i JOIN mandelboxes m ON m.instance_name = i.instance_name AND m.status <> 'EXITED'
        GROUP BY i.instance_name, i.mandelbox_capacity HAVING count(m.mandelbox_id) > i.mandelbox_capacity""",
    "live count column equals live rows": """
        SELECT i.instance_name, i.live_mandelboxes, count(m.mandelbox_id)
        FROM instances i LEFT JOIN mandelboxes m ON m.instance_name = i.instance_name AND m.status <> 'EXITED'
        GROUP BY i.instance_name, i.live_mandelboxes HAVING i.live_mandelboxes <> count(m.mandelbox_id)""",
    "every mandelbox on exactly one existing instance": """
        SELECT m.mandelbox_id FROM mandelboxes m LEFT JOIN instances i ON i.instance_name = m.instance_name
        WHERE i.instance_name IS NULL""",
    "no live mandelbox on an ended instance": """
        SELECT m.mandelbox_id FROM mandelboxes m JOIN instances i ON i.instance_name = m.instance_name
        WHERE m.status <> 'EXITED' AND i.status IN ('TERMINATED', 'LOST')""",
    "per-user limit respected": """
        SELECT user_id, count(*) FROM mandelboxes WHERE status <> 'EXITED'
        GROUP BY user_id HAVING count(*) > :max_per_user""",
    "sum of live counts equals live mandelboxes": """
        SELECT (SELECT coalesce(sum(live_mandelboxes), 0) FROM instances),
               (SELECT count(*) FROM mandelboxes WHERE status <> 'EXITED')
        WHERE (SELECT coalesce(sum(live_mandelboxes), 0) FROM instances)
           <> (SELECT count(*) FROM mandelboxes WHERE status <> 'EXITED')""",
    "ended mandelboxes carry ended_at and end_reason, live ones neither": """
        SELECT mandelbox_id FROM mandelboxes
        WHERE (status = 'EXITED') <> (ended_at IS NOT NULL AND end_reason IS NOT NULL)""",
}


def check_invariants(engine: Engine, *, max_per_user: int) -> list[str]:
    """The broken invariants, each with up to three offending rows; empty when all hold."""
    broken: list[str] = []
    with engine.connect() as connection:
        for name, sql in INVARIANTS.items():
            params = {"max_per_user": max_per_user} if ":max_per_user" in sql else {}
            rows = connection.execute(text(sql), params).fetchmany(3)
            if rows:
                broken.append(f"{name}: {[tuple(row) for row in rows]}")
    return broken


# --- the run --------------------------------------------------------------------------------------------------


class Fleet:
    """Host secrets and which instances are up (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.secrets: dict[str, str] = {}
        self.up: list[str] = []

    def add_secret(self, name: str, secret: str) -> None:
        # Known before the handshake: assignment may pick the host the moment it is ACTIVE.
        with self.lock:
            self.secrets[name] = secret

    def mark_up(self, name: str) -> None:
        with self.lock:
            self.up.append(name)

    def silence(self, name: str) -> None:
        """The host stops heartbeating (a crash, a network partition): the lost-host sweep will find it."""
        with self.lock:
            if name in self.up:
                self.up.remove(name)

    def snapshot(self) -> list[tuple[str, str]]:
        with self.lock:
            return [(name, self.secrets[name]) for name in self.up]

    def secret(self, name: str) -> str:
        with self.lock:
            return self.secrets[name]


def run_stress(config: StressConfig, database_url: str) -> StressReport:
    """Drive the apps from many threads for ``config.assigns`` assign attempts; returns figures and violations."""
    keypair = generate_keypair()
    settings = Settings(
        database_url=database_url,
        env="test",
        jwt_public_key=keypair.public_pem,
        assign_rate_limit="100000000 per minute",
        max_mandelboxes_per_user=config.max_per_user,
        heartbeat_interval_s=config.heartbeat_interval_s,
        host_timeout_s=config.host_timeout_s,
        connect_timeout_s=config.connect_timeout_s,
        log_level="WARNING",
    )
    engine = create_engine(
        normalise_database_url(database_url), pool_size=config.threads + 8, max_overflow=config.threads
    )
    factory = create_session_factory(engine)
    apps = {
        kind: create_app(blueprints=list(bps), settings=settings, session_factory=factory)
        for kind, bps in BLUEPRINTS_BY_API.items()
    }
    admin_headers = {"Authorization": f"Bearer {mint_token(keypair.private_pem, user_id='stress-op', admin=True)}"}
    user_headers = {
        n: {"Authorization": f"Bearer {mint_token(keypair.private_pem, user_id=f'user-{n}', ttl_s=24 * 3600)}"}
        for n in range(config.users)
    }
    report = StressReport()
    deadlocks_before = _deadlocks(engine)
    fleet = Fleet()
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(config.assigns))
    admin = apps["admin"].test_client()

    def record(key: str, status: int) -> None:
        with lock:
            report.answers[key] += 1
            if status >= 500 and "NO_INSTANCE_AVAILABLE" not in key:
                report.server_errors += 1

    def register(client: Any, name: str) -> None:
        body = {
            "instance_name": name,
            "region": random.choice(REGIONS),
            "client_commit_hash": COMMIT,
            "mandelbox_capacity": config.capacity,
        }
        answer = client.post("/admin/instances", json=body, headers=admin_headers)
        assert answer.status_code == 201, answer.get_json()
        secret = answer.get_json()["host_secret"]
        fleet.add_secret(name, secret)
        handshake = {
            "instance_name": name,
            "ip": "10.9.0.1",
            "client_commit_hash": COMMIT,
            "mandelbox_capacity": config.capacity,
        }
        host = apps["host"].test_client()
        answer = host.post("/host/handshake", json=handshake, headers={"Authorization": f"Bearer {secret}"})
        assert answer.status_code == 200, answer.get_json()
        fleet.mark_up(name)

    for region in REGIONS:
        image = {"ami_id": "ami-stress", "active": True, "instance_type": "t3", "mandelbox_capacity": config.capacity}
        assert admin.put(f"/admin/images/{region}/{COMMIT}", json=image, headers=admin_headers).status_code == 200
    for n in range(config.instances):
        register(admin, f"stress-{n:04d}")

    def user_worker(seed: int) -> None:
        rng = random.Random(seed)
        public = apps["public"].test_client()
        host = apps["host"].test_client()
        held: list[tuple[str, dict[str, str]]] = []
        for _ in counter:
            if stop.is_set():
                return
            n = rng.randrange(config.users)
            headers = user_headers[n]
            regions = rng.sample(REGIONS, k=rng.randint(1, len(REGIONS)))
            answer = public.post(
                "/mandelbox/assign", json={"regions": regions, "client_commit_hash": COMMIT}, headers=headers
            )
            body = answer.get_json() or {}
            record(f"assign {answer.status_code} {body.get('error', '')}".strip(), answer.status_code)
            if answer.status_code == 201:
                if rng.random() < 0.3:
                    # The client connects: its host reports the claim.
                    auth = {"Authorization": f"Bearer {fleet.secret(body['instance_name'])}"}
                    claimed = host.put(
                        f"/host/mandelboxes/{body['mandelbox_id']}", json={"status": "CONNECTING"}, headers=auth
                    )
                    record(f"claim {claimed.status_code}", claimed.status_code)
                held.append((body["mandelbox_id"], headers))
            # Users leave: delete one of the held mandelboxes (most of the time).
            while held and (len(held) > 2 or rng.random() < 0.7):
                mandelbox_id, owner = held.pop(rng.randrange(len(held)))
                gone = public.delete(f"/mandelbox/{mandelbox_id}", headers=owner)
                record(f"delete {gone.status_code}", gone.status_code)

    def host_worker(index: int, workers: int) -> None:
        client = apps["host"].test_client()
        while not stop.is_set():
            for name, secret in fleet.snapshot()[index::workers]:
                auth = {"Authorization": f"Bearer {secret}"}
                beat = client.post("/host/heartbeat", json={"instance_name": name}, headers=auth)
                record(f"heartbeat {beat.status_code}", beat.status_code)
                if beat.status_code != 200:
                    continue
                for mandelbox_id in beat.get_json()["stop_mandelboxes"]:
                    done = client.put(f"/host/mandelboxes/{mandelbox_id}", json={"status": "EXITED"}, headers=auth)
                    record(f"exit {done.status_code}", done.status_code)
            stop.wait(config.heartbeat_interval_s)

    def chaos_worker() -> None:
        rng = random.Random(config.seed * 7919)
        client = apps["admin"].test_client()
        host = apps["host"].test_client()
        added = 0
        while not stop.wait(config.chaos_interval_s):
            name, secret = rng.choice(fleet.snapshot())
            roll = rng.random()
            if roll < 0.1:
                # A host falls silent with its mandelboxes on it; a replacement comes up.
                fleet.silence(name)
                added += 1
                register(client, f"stress-extra-{added:04d}")
                with lock:
                    report.silenced += 1
                    report.registrations += 1
            elif roll < 0.5:
                # An operator drains a host (it takes no more work) and registers a replacement.
                drained = client.post(f"/admin/instances/{name}/drain", headers=admin_headers)
                record(f"drain {drained.status_code}", drained.status_code)
                added += 1
                register(client, f"stress-extra-{added:04d}")
                with lock:
                    report.drains += 1
                    report.registrations += 1
            else:
                # A host's mandelboxes exit on their own (crash of the streaming process, the user quits).
                listed = client.get(f"/admin/mandelboxes?instance_name={name}&limit=5000", headers=admin_headers)
                auth = {"Authorization": f"Bearer {secret}"}
                for box in listed.get_json()["mandelboxes"]:
                    if box["status"] != "EXITED":
                        done = host.put(
                            f"/host/mandelboxes/{box['mandelbox_id']}", json={"status": "EXITED"}, headers=auth
                        )
                        record(f"exit {done.status_code}", done.status_code)
                with lock:
                    report.host_exits += 1

    def sweeper() -> None:
        # The scaler's sweeps, racing host reports, deletes, drains and assigns on the same rows.
        while not stop.wait(config.sweep_interval_s):
            with factory() as session:
                result = run_sweeps(session, settings=settings)
            with lock:
                report.lost += len(result.lost_instances)
                report.released += len(result.released_mandelboxes)

    def sampler() -> None:
        # "Never over capacity" is checked while the run is under way, not only at the end.
        while not stop.wait(1.0):
            broken = [
                v
                for v in check_invariants(engine, max_per_user=config.max_per_user)
                if v.startswith(("no instance over capacity", "per-user limit"))
            ]
            with lock:
                report.samples += 1
                report.violations.extend(f"during the run: {v}" for v in broken)

    def guarded(target: Any, *args: Any) -> Any:
        def run() -> None:
            try:
                target(*args)
            except Exception as error:  # a crashed worker is a failed run, not a silent one
                with lock:
                    report.violations.append(f"worker crashed: {type(error).__name__}: {error}")
                stop.set()

        return run

    host_workers = max(1, config.threads // 4)
    background = [
        threading.Thread(target=guarded(host_worker, i, host_workers), daemon=True) for i in range(host_workers)
    ]
    background += [
        threading.Thread(target=guarded(chaos_worker), daemon=True),
        threading.Thread(target=guarded(sweeper), daemon=True),
        threading.Thread(target=guarded(sampler), daemon=True),
    ]
    users = [threading.Thread(target=guarded(user_worker, config.seed * 1000 + i)) for i in range(config.threads)]
    started = time.perf_counter()
    for thread in [*background, *users]:
        thread.start()
    for thread in users:
        thread.join()
    report.duration_s = time.perf_counter() - started
    stop.set()
    for thread in background:
        thread.join(timeout=30)
    report.assigns_attempted = sum(n for key, n in report.answers.items() if key.startswith("assign "))
    report.violations.extend(check_invariants(engine, max_per_user=config.max_per_user))
    if report.server_errors:
        report.violations.append(f"{report.server_errors} unexpected 5xx answers")
    engine.dispose()  # closing the backends flushes their statistics, deadlock counts included
    report.deadlocks = _deadlocks_after(database_url, before=deadlocks_before)
    if report.deadlocks:
        report.violations.append(f"Postgres detected {report.deadlocks} deadlock(s)")
    return report


def _deadlocks(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            ).scalar_one()
        )


def _deadlocks_after(database_url: str, *, before: int, settle_s: float = 2.0) -> int:
    """Deadlocks since ``before``; statistics reach pg_stat_database shortly after backends close."""
    engine = create_engine(normalise_database_url(database_url))
    try:
        deadline = time.monotonic() + settle_s
        while True:
            with engine.connect() as connection:
                connection.execute(text("SELECT pg_stat_clear_snapshot()"))
            seen = _deadlocks(engine) - before
            if seen or time.monotonic() > deadline:
                return seen
            time.sleep(0.25)
    finally:
        engine.dispose()


def print_report(config: StressConfig, report: StressReport) -> None:
    rows = [
        ("assign attempts", f"{report.assigns_attempted:,}"),
        ("duration", f"{report.duration_s:.1f} s"),
        ("assigns/s", f"{report.assigns_per_s:,.0f}"),
        ("assigned (201)", f"{report.answers.get('assign 201', 0):,}"),
        *((f"refused {code}", f"{n:,}") for code, n in report.refusals().items()),
        ("deletes (202)", f"{report.answers.get('delete 202', 0):,}"),
        ("heartbeats (200)", f"{report.answers.get('heartbeat 200', 0):,}"),
        ("drains / replacements", f"{report.drains} / {report.registrations}"),
        ("host exit events", f"{report.host_exits}"),
        ("hosts silenced / marked LOST", f"{report.silenced} / {report.lost}"),
        ("mandelboxes released by sweeps", f"{report.released}"),
        ("deadlocks detected by Postgres", f"{report.deadlocks}"),
        ("invariant samples during the run", f"{report.samples}"),
        ("invariants", "all hold" if not report.violations else f"{len(report.violations)} BROKEN"),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"stress: {config.threads} threads, {config.instances} instances x {config.capacity}, {config.users} users")
    for label, value in rows:
        print(f"  {label:<{width}}  {value:>12}")
    for violation in report.violations:
        print(f"  BROKEN: {violation}")
    figures: list[dict[str, Any]] = [
        {"figure": "assigns_per_s", "value": round(report.assigns_per_s, 1), "threads": config.threads},
        {"figure": "assign_attempts", "value": report.assigns_attempted},
        {"figure": "duration_s", "value": round(report.duration_s, 2)},
        {"figure": "assign_refusals", "value": report.refusals()},
        {"figure": "invariant_violations", "value": len(report.violations)},
        {"figure": "deadlocks", "value": report.deadlocks},
    ]
    for figure in figures:
        print(json.dumps({"bench": "stress", **figure}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    defaults = StressConfig()
    for name in ("assigns", "threads", "instances", "capacity", "users", "max_per_user", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()
    config = StressConfig(**{k: v for k, v in vars(args).items() if k != "keep"})
    random.seed(config.seed)
    name = database_name("fractal_stress")
    url = create_database(PG_SERVER_URL, name)
    try:
        upgrade_to_head(url)
        report = run_stress(config, url)
    finally:
        if not args.keep:
            drop_database(PG_SERVER_URL, name)
    print_report(config, report)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
