"""What bounding every transaction costs: request-shaped transactions with and without the bounds.

    python bench/transaction_bounds.py [--quick]

Each transaction is what a short request does: check a connection out of the pool, run one indexed SELECT, commit,
check it back in. Three engines on the same database, interleaved in rounds so drift on a shared machine hits them
alike: ``plain`` (no bounds, no pre-ping: main before issue 18), ``pre_ping`` (SQLAlchemy's pool_pre_ping, the other
way to survive a database restart), and ``bounded`` (``create_db_engine``: the SET LOCAL statement at checkout,
which also replaces dead connections). Figures: mean microseconds per transaction, and the extra cost of each
over ``plain``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import Engine, create_engine, text

from bench import harness as h
from fractal.config import Settings, normalise_database_url
from fractal.database import create_db_engine


def _transactions(engine: Engine, count: int) -> float:
    """Seconds for ``count`` request-shaped transactions."""
    started = time.perf_counter()
    for _ in range(count):
        with engine.connect() as connection:
            connection.execute(text("SELECT count(*) FROM images WHERE region = 'us-east-1'")).scalar()
            connection.commit()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = h.load_parser(__doc__, quick_help="a few hundred transactions per engine")
    args = parser.parse_args(argv)
    per_round, rounds = (200, 3) if args.quick else (2_000, 5)
    report = h.Report("transaction_bounds", args.quick)
    with h.bench_database("transaction_bounds") as url:
        with h.connect(url) as connection:
            h.seed_images(connection)
        engines = {
            "plain": create_engine(normalise_database_url(url)),
            "pre_ping": create_engine(normalise_database_url(url), pool_pre_ping=True),
            "bounded": create_db_engine(Settings(database_url=url)),
        }
        try:
            for engine in engines.values():
                _transactions(engine, 50)  # warm: connect, prepare caches
            totals = dict.fromkeys(engines, 0.0)
            for _ in range(rounds):
                for name, engine in engines.items():
                    totals[name] += _transactions(engine, per_round)
        finally:
            for engine in engines.values():
                engine.dispose()
    count = per_round * rounds
    mean_us = {name: total / count * 1e6 for name, total in totals.items()}
    for name, value in mean_us.items():
        report.add(f"{name}_transaction", value, "us", transactions=count)
    for name in ("pre_ping", "bounded"):
        report.add(f"{name}_extra", mean_us[name] - mean_us["plain"], "us")
    report.emit()
    return 0


if __name__ == "__main__":
    h.run_main(main)
