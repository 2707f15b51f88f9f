"""The fleet simulator: the real scaler and assignment code on a virtual clock and a throwaway SQLite database.

- With a static target of 0, every user waits about one boot time (and no more than boot + scaler interval +
  retry interval).
- On the bundled daily trace the demand-aware policy waits less at p95 than the static default, at no more idle
  instance-hours (the figures are printed).
- The simulator and the live scaler decide the same on the same state (one code path).
- A seed fixes the whole run.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import event
from sqlalchemy.engine import Engine

from fractal.clock import SQLITE_TEXT_FORMAT, VIRTUAL_CLOCK_FUNCTION, utcnow
from fractal.cloud.memory import MemoryCloud
from fractal.config import Settings
from fractal.database import create_db_engine, create_session_factory
from fractal.scaling.reconcile import ReconcileReport, reconcile_fleet
from fractal.simulation import (
    BootDistribution,
    Policy,
    SessionRequest,
    Simulation,
    SimulationConfig,
    compare,
    export_events,
    read_csv,
    simulate,
    synthetic_trace,
    write_csv,
)
from fractal.simulation.report import format_table, plot
from fractal.simulation.trace import SyntheticSpec

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_TRACE = ROOT / "docs" / "simulation" / "daily-trace.csv"
# The bundled scenario (docs/simulation.md): the default static target (10 free slots per image), hosts that take
# about 8 minutes to boot, a scaler pass a minute.
BUNDLED_CONFIG = SimulationConfig(seed=7, boot=BootDistribution.parse("lognormal:480:0.2"), scaler_interval_s=60)
DEMAND_POLICY = "demand:floor=2"


@pytest.fixture(autouse=True)
def _quiet_scaler_logs() -> Any:
    """A simulated hour is hundreds of scaler passes, each logging a line: keep the output readable (and fast).

    The configuration before is put back after, root level included. Loggers are not cached meanwhile: an app made
    by an earlier test turned caching on, and a module's logger first used here would keep the quiet one for the
    rest of the run (a later test would find its info lines missing)."""
    before = structlog.get_config()
    root_level = logging.getLogger().level
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING), cache_logger_on_first_use=False
    )
    yield
    structlog.configure(**before)
    logging.getLogger().setLevel(root_level)


def evenly(n: int, *, every_s: float, session_s: float, region: str = "eu-west-1") -> list[SessionRequest]:
    start = datetime(2026, 11, 24, 12, tzinfo=UTC)
    return [SessionRequest(start + timedelta(seconds=i * every_s), region, "v1", session_s) for i in range(n)]


def test_a_static_target_of_zero_makes_every_user_wait_about_one_boot_time() -> None:
    # One slot per host and sessions longer than the run: every user needs a host launched for them. Users arrive
    # further apart than a boot, so no one can take a host launched for someone else.
    config = SimulationConfig(seed=1, boot=BootDistribution.parse("const:120"), mandelbox_capacity=1, warmup_s=60)
    result = simulate(evenly(8, every_s=197, session_s=4 * 3600), "static:0", config)
    overall = result.overall
    print(format_table([result]))
    assert overall.served == 8 and overall.refused == 0
    # Launched by the first pass after the 503 (<= 15 s), booted in 120 s, found at the next retry (<= 10 s).
    assert 120 <= overall.wait_p50_s <= 120 + 15 + 10
    assert 120 <= overall.wait_p99_s <= 120 + 15 + 10
    assert overall.launches == 8 and overall.idle_hours < 0.5

    # Arrivals closer together: a host goes to whoever retries first once it is up, so single waits vary, but the
    # median is still one boot.
    crowded = simulate(evenly(12, every_s=97, session_s=4 * 3600), "static:0", config).overall
    assert 120 <= crowded.wait_p50_s <= 120 + 15 + 10 and crowded.launches == 12


@pytest.mark.slow
def test_on_the_bundled_daily_trace_demand_aware_buffers_wait_less_for_no_more_idle_hours() -> None:
    trace = read_csv(BUNDLED_TRACE)
    static, demand = compare(trace, ["static", DEMAND_POLICY], BUNDLED_CONFIG)
    print()
    print(format_table([static, demand], per_region=False))
    print(f"simulated in {static.elapsed_s:.1f} s and {demand.elapsed_s:.1f} s")
    assert static.overall.sessions == demand.overall.sessions == len(trace)
    assert demand.overall.wait_p95_s < static.overall.wait_p95_s
    assert demand.overall.idle_hours <= static.overall.idle_hours


def test_the_bundled_trace_is_the_documented_synthetic_day(tmp_path: Path) -> None:
    """docs/simulation/daily-trace.csv is what `generate` writes for the documented spec (so it can be rebuilt)."""
    written = tmp_path / "trace.csv"
    write_csv(synthetic_trace(bundled_spec(), seed=7), written)
    assert written.read_text() == BUNDLED_TRACE.read_text()


def bundled_spec() -> SyntheticSpec:
    from fractal.simulation.trace import Spike

    return SyntheticSpec(
        sessions=1600,
        regions=("eu-west-1", "us-east-1", "ap-southeast-1"),
        hours=24,
        trough_share=0.1,
        spikes=(Spike(start_h=14, minutes=45, factor=2, region="eu-west-1"),),
        new_version=None,
        region_weights={"us-east-1": 0.05, "ap-southeast-1": 0.05},
    )


def _planned(report: ReconcileReport) -> list[tuple[Any, ...]]:
    """What a pass decided, without the names it gave new hosts (those come from the pass's namer)."""
    decided = []
    for action in report.actions:
        if action.action == "plan_launch":
            decided.append((action.action, action.region, action.client_commit_hash, sorted(action.detail.items())))
        elif action.action in ("drain", "terminate", "lost", "released"):
            decided.append((action.action, action.instance_name, action.detail.get("reason")))
    return sorted(decided, key=repr)


def _live_pass_on_a_copy(simulation: Simulation, copy: Path) -> ReconcileReport:
    """The live scaler's pass on a copy of the simulator's database: a plain engine on the real clock (no virtual
    clock), the pass told the time as a test tells it, and another cloud."""
    simulation.save_database(copy)
    live_settings = Settings(**{**simulation.settings.model_dump(), "database_url": f"sqlite:///{copy}"})
    engine = create_db_engine(live_settings)

    @event.listens_for(engine, "connect")
    def _real_clock_defaults(dbapi_connection: Any, _record: Any) -> None:
        # The copied schema's column defaults name the virtual clock's function: here it is the real clock, as
        # CURRENT_TIMESTAMP is in a live schema. db_now() itself is not touched (the engine has no virtual clock).
        dbapi_connection.create_function(VIRTUAL_CLOCK_FUNCTION, 0, lambda: utcnow().strftime(SQLITE_TEXT_FORMAT))

    try:
        return reconcile_fleet(
            create_session_factory(engine), settings=live_settings, cloud=MemoryCloud(), now=simulation.now
        )
    finally:
        engine.dispose()


def test_the_simulator_and_the_live_scaler_decide_the_same_on_the_same_state(tmp_path: Path) -> None:
    trace = synthetic_trace(SyntheticSpec(sessions=150, regions=("eu-west-1", "us-east-1"), hours=1), seed=3)
    config = SimulationConfig(seed=3, scale_down_delay_s=60)
    simulation = Simulation(trace, Policy.parse("demand:floor=2,safety=2"), config, workdir=tmp_path / "sim")
    compared: list[list[tuple[Any, ...]]] = []
    try:
        # At every due pass while users wait after 503s, from the 20th on: the live pass on a copy of the state,
        # then the simulator's own pass on the state itself, until one of them launched.
        while not any(item[0] == "plan_launch" for plans in compared for item in plans):
            assert simulation.now < simulation.ends_at and len(compared) < 60, compared
            due = simulation.now >= simulation._next_scaler
            if due and sum(simulation._waiting.values()) > 0 and simulation.scaler_passes > 20:
                live = _live_pass_on_a_copy(simulation, tmp_path / f"live-{len(compared)}.db")
                simulated = simulation.scaler_step()  # its clock is the database's: virtual
                simulation._next_scaler = simulation.now + timedelta(seconds=config.scaler_interval_s)
                assert simulated.started_at == live.started_at == simulation.now
                assert _planned(live) == _planned(simulated)
                compared.append(_planned(live))
            simulation.step()
            simulation.now = simulation.next_time()
    finally:
        simulation.close()
    launches = [dict(item[3]) for plans in compared for item in plans if item[0] == "plan_launch"]
    assert {launch["target_reason"] for launch in launches} <= {"demand", "floor", "ceiling"}
    print(f"{len(compared)} passes compared; launches planned: {launches}")


def test_a_seed_fixes_the_run_and_another_seed_changes_it(tmp_path: Path) -> None:
    trace = synthetic_trace(SyntheticSpec(sessions=60, regions=("eu-west-1",), hours=0.5), seed=5)
    config = SimulationConfig(seed=11, boot=BootDistribution.parse("lognormal:120:0.4"), launch_failure_rate=0.2)
    first, second = simulate(trace, "static:2", config), simulate(trace, "static:2", config)
    other = simulate(trace, "static:2", SimulationConfig(**{**config.__dict__, "seed": 12}))

    def figures(result: Any) -> dict[str, Any]:
        return {k: v for k, v in result.as_dict().items() if k != "elapsed_s"}

    assert figures(first) == figures(second)
    assert first.series == second.series
    assert figures(first) != figures(other)
    assert first.overall.launch_failures > 0  # the failure rate is applied (and counted)
    png = plot([first, other], tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_result_is_the_same_whatever_the_number_of_worker_processes() -> None:
    """Regions are independent (users ask for one, the scaler decides per region and version, each region draws its
    own boots and failures), so splitting a run by region over processes changes no figure."""
    regions = ("eu-west-1", "us-east-1", "ap-southeast-1")
    trace = synthetic_trace(SyntheticSpec(sessions=120, regions=regions, hours=0.5), seed=4)
    config = SimulationConfig(
        seed=4,
        launch_failure_rate=0.1,
        region_capacity=5,
        scale_down_delay_s=120,
        scaler_interval_s=30,
        give_up_s=300,
        warmup_s=300,
    )
    policies = ["static:1", "demand:floor=1"]
    alone = compare(trace, policies, config)
    split = compare(trace, policies, config, workers=2)

    def figures(result: Any) -> dict[str, Any]:
        return {k: v for k, v in result.as_dict().items() if k != "elapsed_s"}

    for one, two in zip(alone, split, strict=True):
        assert figures(one) == figures(two)
        assert one.series == two.series
        assert [r.region for r in two.regions] == sorted(regions)
        assert two.overall.sessions == len(trace) and two.overall.launches > 0
    assert figures(alone[0]) != figures(alone[1])  # the policies differ: the comparison is not vacuous


def test_a_region_out_of_capacity_refuses_launches_and_its_users_give_up() -> None:
    config = SimulationConfig(
        seed=2, boot=BootDistribution.parse("const:60"), mandelbox_capacity=1, region_capacity=3, give_up_s=300
    )
    result = simulate(evenly(6, every_s=20, session_s=3600), "static:0", config)
    print(format_table([result]))
    overall = result.overall
    assert overall.launches == 3 and overall.capacity_errors > 0
    assert (overall.served, overall.refused) == (3, 3)
    assert overall.refused_share == 0.5 and overall.wait_p99_s == 300


def test_an_export_of_the_audit_log_gives_back_the_sessions_that_were_replayed(tmp_path: Path) -> None:
    """The operator's loop: a deployment's events (here: a simulated one's) exported as a trace, replayed."""
    trace = synthetic_trace(SyntheticSpec(sessions=80, regions=("eu-west-1", "us-east-1"), hours=1), seed=9)
    simulation = Simulation(trace, Policy.parse("static:1"), SimulationConfig(seed=9), workdir=tmp_path / "sim")
    try:
        while simulation.now <= simulation.ends_at:
            simulation.step()
            simulation.now = simulation.next_time()
        exported = export_events(simulation.session, until=simulation.now)
    finally:
        simulation.close()
    assert len(exported) == len(trace)
    assert sorted((s.region, s.client_commit_hash) for s in exported) == sorted(
        (s.region, s.client_commit_hash) for s in trace
    )
    # Arrivals are the first 503 (or the assign), on the simulator's 5 s ticks: within one tick of the trace's.
    for original, found in zip(sorted(trace), sorted(exported), strict=True):
        assert timedelta(0) <= found.arrival - original.arrival <= timedelta(seconds=5)
    csv_path = tmp_path / "exported.csv"
    write_csv(exported, csv_path)
    assert read_csv(csv_path) == sorted(
        SessionRequest(s.arrival, s.region, s.client_commit_hash, round(s.session_s, 1)) for s in exported
    )


def test_the_fractal_command_exports_the_audit_log_and_replays_it(tmp_path: Path) -> None:
    """`fractal events export` then `fractal simulate run --compare`: the operator's loop from the console script."""
    from click.testing import CliRunner

    from fractal.console import main as fractal_main

    trace = synthetic_trace(SyntheticSpec(sessions=30, regions=("eu-west-1",), hours=0.5), seed=3)
    simulation = Simulation(trace, Policy.parse("static:1"), SimulationConfig(seed=3), workdir=tmp_path / "sim")
    try:
        while simulation.now <= simulation.ends_at:
            simulation.step()
            simulation.now = simulation.next_time()
        simulation.session.commit()
        until = simulation.now
        database = simulation.save_database(tmp_path / "simulation.db")
        exported_csv = tmp_path / "week.csv"
        runner = CliRunner()
        result = runner.invoke(
            fractal_main,
            [
                "events",
                "export",
                "-o",
                str(exported_csv),
                "--database-url",
                f"sqlite:///{database}",
                "--until",
                until.isoformat(),
                "--days",
                "1",
            ],
        )
    finally:
        simulation.close()
    assert result.exit_code == 0, result.output
    assert len(read_csv(exported_csv)) == len(trace)

    figures = tmp_path / "figures.json"
    result = runner.invoke(
        fractal_main,
        [
            "simulate",
            "run",
            "--trace",
            str(exported_csv),
            "--compare",
            "static:1",
            "demand:floor=1",
            "--seed",
            "3",
            "--json",
            str(figures),
            "--overall-only",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "static" in result.output and "demand" in result.output
    assert figures.stat().st_size > 0


def test_policies_parse_and_validate_like_the_admin_api() -> None:
    policy = Policy.parse("demand:safety=2,window=600,floor=1,ceiling=30,lead=150,schedule=18-21@8")
    assert policy.buffer_policy is not None
    assert policy.buffer_policy["schedule"] == [{"hours_utc": [18, 19, 20, 21], "min_free": 8}]
    assert Policy.parse("static:3").target_free == 3 and Policy.parse("static").target_free is None
    for bad in ("demand:floor=5,ceiling=2", "demand:speed=3", "elastic", "static:x", "demand:schedule=18-25@2"):
        with pytest.raises(ValueError):
            Policy.parse(bad)


HISTORY_TABLES = ("mandelboxes", "events", "instances", "heartbeats")


def test_on_sqlite_no_statement_of_the_scaler_assign_or_host_paths_reads_a_whole_history_table() -> None:
    """Every statement an hour of the simulator sends (the real scaler pass, assignment and host paths, on SQLite:
    the embedded default) is planned on an index for the tables that grow with history. A move by instance once
    read every mandelbox ever made, because SQLite uses a partial index only when the query states its condition."""
    plans: dict[str, list[str]] = {}

    def explain(_conn: Any, cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        verb = statement.lstrip().split(" ", 1)[0].upper()
        if many or statement in plans or verb not in ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH"):
            return
        rows = cursor.connection.execute("EXPLAIN QUERY PLAN " + statement, parameters).fetchall()
        plans[statement] = [str(row[-1]) for row in rows]

    trace = synthetic_trace(SyntheticSpec(sessions=300, regions=("eu-west-1", "us-east-1"), hours=1), seed=11)
    event.listen(Engine, "before_cursor_execute", explain)
    try:
        result = simulate(trace, "demand", SimulationConfig(seed=11), workers=1)
    finally:
        event.remove(Engine, "before_cursor_execute", explain)
    assert result.overall.served > 0 and result.overall.terminations > 0  # ends, drains and terminations ran
    assert len(plans) > 30
    full_scans = {
        statement: steps
        for statement, steps in plans.items()
        for step in steps
        if any(step == f"SCAN {table}" for table in HISTORY_TABLES)
    }
    assert full_scans == {}
