"""How fast the fleet simulator replays demand: the target is a day of 100,000 sessions over 20 regions in under a
minute.

Usage: .venv/bin/python bench/simulate.py [--hours H] [--quick] [--policy P] [--workers N]
Runs the synthetic day (100,000 sessions over 20 regions, a spike and a v1 -> v2 roll-out), all 24 hours by
default (``--hours H``: the first H hours only, and the day projected from them; ``--quick``: 20 minutes), through
the real assign and scaler code on throwaway in-memory SQLite databases, the regions split over ``--workers``
processes (default: one per core), and prints a table and one JSON line: wall and CPU seconds (this process and its
workers), where the CPU went (users: the asks, assign_mandelbox included; scaler: reconcile_fleet; hosts: boots,
claims, heartbeats, session ends; sample: the plot's reads), sessions, asks and scaler passes simulated. The target
is on the wall clock: the figures do not depend on the number of workers, the time does.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from fractal.simulation.__main__ import quiet_logs
from fractal.simulation.engine import SimulationConfig, simulate
from fractal.simulation.trace import DEFAULT_REGIONS, SyntheticSpec, synthetic_trace

DAY_SESSIONS = 100_000
TARGET_S = 60.0


def _cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended (the pool's workers, once joined)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--full", action="store_true", help="the whole day (the default)")
    parser.add_argument("--quick", action="store_true", help="20 simulated minutes (the smoke test)")
    parser.add_argument("--policy", default="demand")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: cores)")
    args = parser.parse_args()
    hours = 24.0 if args.full else (1 / 3 if args.quick else args.hours)
    quiet_logs()
    day = synthetic_trace(SyntheticSpec(sessions=DAY_SESSIONS, regions=DEFAULT_REGIONS, hours=24.0), seed=1)
    start = day[0].arrival.replace(hour=0, minute=0, second=0)
    trace = [s for s in day if (s.arrival - start).total_seconds() < hours * 3600]
    cpu, wall = _cpu_s(), time.perf_counter()
    result = simulate(trace, args.policy, SimulationConfig(seed=1), workers=args.workers)
    cpu, wall = _cpu_s() - cpu, time.perf_counter() - wall
    # Work grows with the sessions (assigns, ends) and with the simulated time (scaler passes): project by both.
    scale = max(DAY_SESSIONS / max(len(trace), 1), 24.0 / hours) if hours < 24 else 1.0
    figures = {
        "simulated_hours": round(hours, 3),
        "sessions": len(trace),
        "regions": len({s.region for s in trace}),
        "workers": args.workers,
        "scaler_passes": result.scaler_passes,
        "assign_calls": result.assign_calls,
        "service_calls": result.service_calls,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "cpu_by_part_s": result.cpu_s,
        "sessions_per_cpu_s": round(len(trace) / cpu, 1) if cpu else None,
        "projected_day_wall_s": round(wall * scale, 1),
        "projected_day_cpu_s": round(cpu * scale, 1),
        "target_s": TARGET_S,
        "meets_target": wall * scale < TARGET_S,
        "p95_wait_s": result.overall.wait_p95_s,
        "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
    }
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key.ljust(width)}  {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
