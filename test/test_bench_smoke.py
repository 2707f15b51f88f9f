"""The benchmark harness keeps working: bench/assign.py --quick runs end to end and prints well-formed figures.

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


@pytest.mark.slow
def test_assign_bench_quick_prints_json_figures() -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (./commands bench installs it)")
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
