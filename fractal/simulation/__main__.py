"""``python -m fractal.simulation`` (and ``./commands simulate``): run, compare, generate and export traces.

python -m fractal.simulation run --synthetic --compare static demand --plot sim.png
python -m fractal.simulation run --trace last-week.csv --policy demand:safety=2,floor=2 --json out.json
python -m fractal.simulation run --synthetic --sessions 100000 --regions 20 --policy demand --workers 2
python -m fractal.simulation export --days 7 -o last-week.csv      # from DATABASE_URL's audit log
python -m fractal.simulation generate --sessions 5000 --regions 5 -o trace.csv
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from fractal.clock import as_utc, database_now
from fractal.config import Settings
from fractal.database import create_db_engine, create_session_factory
from fractal.simulation.cloud import BootDistribution
from fractal.simulation.engine import Policy, SimulationConfig, compare
from fractal.simulation.trace import (
    DEFAULT_REGIONS,
    SessionRequest,
    SyntheticSpec,
    export_events,
    read_csv,
    synthetic_trace,
    write_csv,
)


def quiet_logs() -> None:
    """Only warnings: a simulated day runs thousands of scaler passes, each of which logs a line. Loggers are not
    cached, so a process that configures logging again later (an app made in the same process) gets its own."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING), cache_logger_on_first_use=False
    )
    logging.getLogger().setLevel(logging.WARNING)


def _synthetic_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=2000, help="sessions in the synthetic trace (2000)")
    parser.add_argument("--regions", type=int, default=3, help=f"regions, 1-{len(DEFAULT_REGIONS)} (3)")
    parser.add_argument("--hours", type=float, default=24.0, help="length of the synthetic trace (24)")
    parser.add_argument("--no-rollout", action="store_true", help="one client version only (no v1 -> v2 roll-out)")


def _spec(args: argparse.Namespace) -> SyntheticSpec:
    if not 1 <= args.regions <= len(DEFAULT_REGIONS):
        raise SystemExit(f"--regions must be 1-{len(DEFAULT_REGIONS)}")
    return SyntheticSpec(
        sessions=args.sessions,
        regions=DEFAULT_REGIONS[: args.regions] if args.regions != 3 else SyntheticSpec().regions,
        hours=args.hours,
        new_version=None if args.no_rollout else "v2",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("want a whole number of at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fractal.simulation", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="replay a trace under one or more buffer policies")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="a trace CSV (arrival,region,client_commit_hash,session_s)")
    source.add_argument("--synthetic", action="store_true", help="generate the trace (see --sessions ...)")
    _synthetic_args(run)
    run.add_argument("--policy", action="append", default=[], help="static | static:N | demand[:k=v,...]")
    run.add_argument("--compare", nargs="+", default=[], metavar="POLICY", help="several policies, side by side")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--boot", type=BootDistribution.parse, default=BootDistribution(), help="lognormal:120:0.25")
    run.add_argument("--launch-failure-rate", type=float, default=0.0, help="share of launches that fail (0)")
    run.add_argument("--region-capacity", type=int, default=None, help="hosts the cloud runs per region at most")
    run.add_argument("--instance-type", default="g4dn.xlarge")
    run.add_argument("--capacity", type=int, default=4, help="mandelboxes per host (4)")
    run.add_argument("--default-target", type=int, default=10, help="FRACTAL_TARGET_FREE_MANDELBOXES (10)")
    run.add_argument("--give-up", type=float, default=600.0, help="seconds a user retries before leaving (600)")
    run.add_argument("--retry", type=float, default=None, help="seconds between a user's retries (Retry-After)")
    run.add_argument("--scaler-interval", type=float, default=15.0, help="FRACTAL_SCALER_INTERVAL_S (15)")
    run.add_argument("--plot", type=Path, help="write a PNG of demand, capacity and free slots")
    run.add_argument("--json", type=Path, help="write the figures as JSON")
    run.add_argument("--overall-only", action="store_true", help="no per-region lines in the table")
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="processes to split the regions over (1); the figures do not depend on it",
    )

    generate = commands.add_parser("generate", help="write a synthetic trace CSV")
    _synthetic_args(generate)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("-o", "--output", type=Path, required=True)

    export = commands.add_parser("export", help="a trace CSV from a deployment's audit log (DATABASE_URL)")
    export.add_argument("-o", "--output", type=Path, required=True)
    export.add_argument("--since", help="ISO time (default: --days before now)")
    export.add_argument("--until", help="ISO time (default: now)")
    export.add_argument("--days", type=float, default=7.0)
    export.add_argument("--database-url", help="default: DATABASE_URL / FRACTAL_DATABASE_URL")
    return parser


def _time(text: str | None) -> datetime | None:
    return as_utc(datetime.fromisoformat(text.replace("Z", "+00:00"))) if text else None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_logs()
    if args.command == "generate":
        generated = synthetic_trace(_spec(args), seed=args.seed)
        write_csv(generated, args.output)
        print(f"wrote {len(generated)} sessions to {args.output}")
        return 0
    if args.command == "export":
        settings = Settings(database_url=args.database_url) if args.database_url else Settings()
        engine = create_db_engine(settings)
        try:
            with create_session_factory(engine)() as session:
                until = _time(args.until) or database_now(session)
                since = _time(args.since) or until - timedelta(days=args.days)
                exported = export_events(session, since=since, until=until)
        finally:
            engine.dispose()
        write_csv(exported, args.output)
        print(f"wrote {len(exported)} sessions ({since.isoformat()} .. {until.isoformat()}) to {args.output}")
        return 0

    trace: list[SessionRequest] = read_csv(args.trace) if args.trace else synthetic_trace(_spec(args), seed=args.seed)
    names = [*args.policy, *args.compare] or ["static"]
    try:
        policies = [Policy.parse(name) for name in names]
    except ValueError as error:
        raise SystemExit(str(error)) from error
    config = SimulationConfig(
        seed=args.seed,
        boot=args.boot,
        launch_failure_rate=args.launch_failure_rate,
        region_capacity=args.region_capacity,
        instance_type=args.instance_type,
        mandelbox_capacity=args.capacity,
        default_target_free=args.default_target,
        give_up_s=args.give_up,
        scaler_interval_s=args.scaler_interval,
        **({"retry_s": args.retry} if args.retry else {}),
    )
    results = compare(trace, policies, config, workers=args.workers)
    from fractal.simulation.report import format_table, plot

    print(f"{len(trace)} sessions, {len({t.region for t in trace})} regions, seed {args.seed}, boot {config.boot}")
    print(format_table(results, per_region=not args.overall_only))
    for result in results:
        print(f"{result.policy}: simulated in {result.elapsed_s:.1f} s ({result.scaler_passes} scaler passes)")
    if args.workers > 1:
        print(f"({args.workers} worker processes; elapsed: until each policy's last part was done)")
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    if args.plot:
        print(f"plot: {plot(results, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
