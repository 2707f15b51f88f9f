"""A short version of bench/stress.py: contended assigns with heartbeats, drains, deletions, host exits, silent
hosts and the sweeps all at once on a fresh database, then the invariants checked with SQL (the checker itself is
shown to catch a broken counter) and no deadlock reported by Postgres (the fleet's one lock order)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from bench.stress import StressConfig, check_invariants, run_stress
from fractal.config import normalise_database_url
from test.throwaway import throwaway_database

pytestmark = pytest.mark.slow


@pytest.fixture
def stress_database() -> Iterator[str]:
    with throwaway_database("fractal_stress") as url:
        yield url


def test_contended_run_keeps_every_invariant(stress_database: str) -> None:
    config = StressConfig(assigns=2000, threads=6, instances=12, capacity=6, users=80, max_per_user=2)
    report = run_stress(config, stress_database)

    assert not report.violations, report.violations
    assert report.assigns_attempted == config.assigns
    assert report.answers["assign 201"] > config.assigns // 10  # real work, not only refusals
    assert set(report.refusals()) <= {"409 USER_ALREADY_ACTIVE", "503 NO_INSTANCE_AVAILABLE"}, report.refusals()
    assert report.answers["delete 202"] > 0 and report.answers["heartbeat 200"] > 0
    assert report.drains > 0 and report.host_exits > 0 and report.samples > 0
    # The sweeps raced the rest for real: silent hosts were marked LOST with their boxes, and nothing deadlocked.
    assert report.silenced > 0 and report.lost > 0, (report.silenced, report.lost)
    assert report.deadlocks == 0

    # The checker is not blind: one corrupted counter breaks two invariants.
    engine = create_engine(normalise_database_url(stress_database))
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE instances SET live_mandelboxes = live_mandelboxes + 1 WHERE instance_name = ("
                " SELECT instance_name FROM instances WHERE live_mandelboxes < mandelbox_capacity LIMIT 1)"
            )
        )
    broken = check_invariants(engine, max_per_user=config.max_per_user)
    engine.dispose()
    assert [line.split(":")[0] for line in broken] == [
        "live count column equals live rows",
        "sum of live counts equals live mandelboxes",
    ]
