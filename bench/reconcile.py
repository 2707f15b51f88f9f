"""One scaler pass over 100, 1,000 and 10,000 instances in 20 regions, on Postgres, with an in-memory cloud.

Usage: .venv/bin/python bench/reconcile.py [--sizes 100,1000,10000] [--passes 3]
Uses its own fresh database on FRACTAL_TEST_PG_URL's server (default postgresql://postgres@127.0.0.1:5432/test)
and drops it afterwards. Prints a table, then one JSON line per figure. Target: ≤ 0.5 s at 10,000 instances.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, insert, text

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the shared test helpers live beside bench/
    sys.path.insert(0, str(ROOT))

from fractal.auth.hosts import hash_host_secret  # noqa: E402
from fractal.clock import utcnow  # noqa: E402
from fractal.cloud.memory import MemoryCloud  # noqa: E402
from fractal.config import Settings, normalise_database_url  # noqa: E402
from fractal.database import create_session_factory  # noqa: E402
from fractal.models import Heartbeat, Image, Instance, InstanceStatus  # noqa: E402
from fractal.scaling.reconcile import reconcile_fleet  # noqa: E402
from test.throwaway import throwaway_database  # noqa: E402

REGIONS = [f"bench-region-{n:02d}" for n in range(20)]
CAPACITY = 4


def seed(engine: Any, size: int) -> None:
    """A steady fleet: per region mostly full hosts, enough free slots to meet the target, fresh heartbeats."""
    now = utcnow()
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE events, heartbeats, mandelboxes, instances, images RESTART IDENTITY CASCADE"))
        connection.execute(
            insert(Image),
            [
                {
                    "region": r,
                    "client_commit_hash": "bench",
                    "ami_id": "ami-bench",
                    "active": True,
                    "instance_type": "g4dn.xlarge",
                    "mandelbox_capacity": CAPACITY,
                    "target_free": 10,
                }
                for r in REGIONS
            ],
        )
        rows, beats = [], []
        for n in range(size):
            region = REGIONS[n % len(REGIONS)]
            index = n // len(REGIONS)
            live = CAPACITY if index >= 3 else 1  # three part-empty hosts per region: 9 free, +1 busy → deficit 1
            name = f"{region}-host-{index:05d}"
            rows.append(
                {
                    "instance_name": name,
                    "cloud_provider_id": f"mem-{n}",
                    "region": region,
                    "client_commit_hash": "bench",
                    "ami_id": "ami-bench",
                    "instance_type": "g4dn.xlarge",
                    "ip": f"10.{n // 65536}.{(n // 256) % 256}.{n % 256}",
                    "mandelbox_capacity": CAPACITY,
                    "live_mandelboxes": live,
                    "status": InstanceStatus.ACTIVE,
                    "host_secret_hash": hash_host_secret(name),
                    "created_at": now - timedelta(hours=1),
                    "status_changed_at": now - timedelta(hours=1),
                }
            )
            beats.append({"instance_name": name, "last_heartbeat_at": now, "metrics": {}})
        connection.execute(insert(Instance), rows)
        connection.execute(insert(Heartbeat), beats)
        connection.execute(text("ANALYZE"))


def measure(url: str, size: int, passes: int) -> dict[str, Any]:
    settings = Settings(
        database_url=url,
        env="test",
        target_free_mandelboxes=10,
        max_instances_per_region=10**6,
        log_json=True,
        log_level="WARNING",
    )
    engine = create_engine(normalise_database_url(url), pool_size=5)
    factory = create_session_factory(engine)
    seed(engine, size)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    timings, counts, actions = [], [], []
    for _ in range(passes):
        cloud = MemoryCloud()
        statements.clear()
        started = time.perf_counter()
        report = reconcile_fleet(factory, settings=settings, cloud=cloud)
        timings.append(time.perf_counter() - started)
        counts.append(len(statements))
        actions.append(len(report.actions))
        assert report.ran and not report.errors
    engine.dispose()
    return {
        "bench": "reconcile_pass",
        "instances": size,
        "regions": len(REGIONS),
        "first_pass_s": round(timings[0], 4),
        "median_pass_s": round(statistics.median(timings), 4),
        "statements_per_pass": counts,
        "actions_per_pass": actions,
        "target_s": 0.5,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 and 1,000 instances, one pass each")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.passes = "100,1000", 1
    with throwaway_database("fractal_bench_reconcile") as url:
        results = [measure(url, int(size), args.passes) for size in args.sizes.split(",")]
    print(f"{'instances':>10} {'regions':>8} {'first pass s':>13} {'median s':>9} {'statements':>16} {'actions':>12}")
    for r in results:
        print(
            f"{r['instances']:>10} {r['regions']:>8} {r['first_pass_s']:>13} {r['median_pass_s']:>9} "
            f"{r['statements_per_pass']!s:>16} {r['actions_per_pass']!s:>12}"
        )
    for r in results:
        print(json.dumps(r))
    return 0 if all(r["median_pass_s"] <= r["target_s"] for r in results if r["instances"] >= 10_000) else 1


if __name__ == "__main__":
    sys.exit(main())
