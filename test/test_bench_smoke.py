"""The benchmark harness keeps working: bench/assign.py and bench/yardsticks.py --quick run end to end and print
well-formed figures.

Speed is not asserted (the machine is shared); only that every figure the report promises is there, numeric,
and that the assigns it drove succeeded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {
    "workers",
    "healthz_rate",
    "healthz_p50",
    "healthz_p99",
    "assign_2s_rate",
    "assign_2s_p50",
    "assign_2s_p99",
    "assign_2s_non_2xx",
    "assign_4s_rate",
    "assign_to_baseline",
    "assign_4s_to_2s",
    "rss_worker_max",
    "mandelboxes_created",
    "machine",
}


YARDSTICK_PHASES = (
    "bare",
    "healthz",
    "ref_assign",
    "assign",
    "floor",
    "ref_heartbeat",
    "heartbeat",
    "heartbeat_floor",
    "scarce",
    "mixed_public",
)


def require_wrk() -> None:
    """Under ./commands test (which installs wrk) a missing wrk fails; elsewhere the bench tests are skipped."""
    if shutil.which("wrk") is not None:
        return
    if os.environ.get("FRACTAL_TEST_REQUIRE_WRK"):
        pytest.fail("wrk is not installed, yet ./commands test should have installed it (ensure_test_tools)")
    pytest.skip("wrk is not installed (./commands test and ./commands bench install it)")


def run_bench(name: str, timeout_s: int) -> tuple[str, list[dict[str, Any]]]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick"],
        cwd=ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_yardsticks_quick_compares_every_phase_with_the_reference() -> None:
    require_wrk()
    stdout, figures = run_bench("yardsticks", 300)
    by_name = {figure["figure"]: figure for figure in figures}
    for phase in YARDSTICK_PHASES:
        assert float(by_name[f"{phase}_rate"]["value"]) > 0, phase
        assert f"{phase}_p99" in by_name
    # Outside the scarce phase every answer was 2xx, on both apps; in it nearly every assign was a 503.
    for phase in ("bare", "healthz", "ref_assign", "assign", "floor", "ref_heartbeat", "heartbeat", "heartbeat_floor"):
        assert by_name[f"{phase}_non_2xx"]["value"] == 0, phase
    assert int(by_name["scarce_503"]["value"]) > 0
    assert int(by_name["scarce_2xx"]["value"]) <= 8
    assert by_name["mixed_public_non_2xx"]["value"] == 0
    ratios = ("healthz_to_bare", "assign_to_ref", "assign_p99_to_ref", "heartbeat_to_ref", "floor_to_ref")
    for ratio in (*ratios, "heartbeat_floor_to_ref", "heartbeat_to_floor"):
        assert float(by_name[ratio]["value"]) > 0, ratio
    # Honest load: no assign phase ran out of fresh tokens.
    assert "distinct tokens" not in stdout
    assert "== yardsticks (quick" in stdout


@pytest.mark.slow
def test_assign_bench_quick_prints_json_figures() -> None:
    require_wrk()
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "assign.py"), "--quick"],
        cwd=ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    by_name = {figure["figure"]: figure for figure in figures}
    assert set(by_name) >= EXPECTED, sorted(EXPECTED - set(by_name))
    for figure in figures:
        assert figure["bench"] == "assign"
        assert {"figure", "value", "unit", "run", "client"} <= set(figure)
        assert figure["client"].startswith("wrk ")
        if figure["figure"] != "machine":
            assert isinstance(figure["value"], int | float), figure
            assert figure["value"] >= 0, figure
    # The load really went through the API: every assign answered 2xx and created its mandelbox.
    assert by_name["assign_2s_rate"]["value"] > 0
    assert by_name["healthz_rate"]["value"] > 0
    assert by_name["assign_2s_non_2xx"]["value"] == 0
    assert by_name["assign_4s_non_2xx"]["value"] == 0
    measured = by_name["assign_2s_rate"]["requests"] + by_name["assign_4s_rate"]["requests"]
    assert by_name["mandelboxes_created"]["value"] >= measured > 0
    assert by_name["workers"]["value"] >= 1
    assert 0 < by_name["rss_worker_max"]["value"] < 4096
    # The human table is printed too.
    assert "== bench assign (quick, load client: wrk" in done.stdout


def test_simulate_bench_quick_prints_json_figures() -> None:
    """bench/simulate.py --quick: the first 20 minutes of the synthetic day, over worker processes (no wrk)."""
    stdout, figures = run_bench("simulate", 600)
    assert len(figures) == 1, stdout
    (figure,) = figures
    assert figure["workers"] >= 1 and figure["regions"] == 20
    assert figure["sessions"] > 0 and figure["assign_calls"] >= figure["service_calls"] > 0
    assert figure["scaler_passes"] > 0
    for key in ("wall_s", "cpu_s", "projected_day_wall_s", "projected_day_cpu_s", "p95_wait_s"):
        assert isinstance(figure[key], int | float) and figure[key] >= 0, key
    assert set(figure["cpu_by_part_s"]) == {"hosts", "sample", "scaler", "users"}
    assert isinstance(figure["meets_target"], bool)
