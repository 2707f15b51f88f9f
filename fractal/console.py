"""The ``fractal`` command: the operators' CLI over the admin API (built on :mod:`fractal.client`).

Not to be confused with ``fractal/cli.py``, the Flask commands (``flask --app admin_app token|scaler``).

Reads ``FRACTAL_ADMIN_URL`` (default http://127.0.0.1:8001) and ``FRACTAL_API_KEY`` or ``FRACTAL_ADMIN_TOKEN``
(credentials are never taken on the command line, where ``ps`` would show them). Human tables by default, ``--json``
for scripts. Exit codes: 0 done, 1 the API refused (a one-line ``error: <status> <CODE>: <message>`` on stderr),
2 usage (a bad option, no credential), 3 the API cannot be reached, 4 a ``--wait`` timed out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from fractal.client import AdminClient, ApiError, Capacity, Instance, UnreachableError

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4
DEFAULT_ADMIN_URL = "http://127.0.0.1:8001"
SCOPES = ("admin:read", "admin:write", "images:write")
INSTANCE_STATUSES = ("PRE_CONNECTION", "ACTIVE", "DRAINING", "TERMINATING", "TERMINATED", "LOST")
MANDELBOX_STATUSES = ("ALLOCATED", "CONNECTING", "RUNNING", "DYING", "EXITED")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Context:
    url: str
    credential: str | None
    json: bool
    http_timeout_s: float
    _client: AdminClient | None = None

    @property
    def client(self) -> AdminClient:
        if self.credential is None:
            raise click.UsageError("Set FRACTAL_API_KEY (an fk_… key) or FRACTAL_ADMIN_TOKEN (an admin JWT).")
        if self._client is None:
            self._client = AdminClient(self.url, self.credential, timeout_s=self.http_timeout_s)
        return self._client


class WaitTimeout(Exception):
    pass


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Context).json = True


def json_option(command: F) -> F:
    """``--json`` on every command too (``fractal images list --json`` as well as ``fractal --json images list``)."""
    option = click.option(
        "--json", "as_json", is_flag=True, expose_value=False, callback=_set_json, help="Print JSON instead of a table."
    )
    return option(command)


# output


def wait_options(what: str) -> Callable[[F], F]:
    """``--wait`` (showing ``what``), ``--timeout`` (then exit 4) and the hidden poll ``--interval``."""

    def decorate(command: F) -> F:
        command = click.option(
            "--interval", "interval_s", type=click.FloatRange(0.05), default=2, show_default=True, hidden=True
        )(command)
        command = click.option(
            "--timeout",
            "timeout_s",
            type=click.FloatRange(0),
            default=600,
            show_default=True,
            help="Seconds --wait waits (then exit 4).",
        )(command)
        return click.option("--wait", is_flag=True, help=what)(command)

    return decorate


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: _plain(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%SZ")
    if isinstance(value, dict):
        if all(isinstance(item, int) for item in value.values()):  # counters (instances by status): the non-zero
            value = {key: item for key, item in value.items() if item}
        return " ".join(f"{key}={item}" for key, item in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value) or "-"
    return str(value)


def table(rows: Sequence[Any], columns: Sequence[str]) -> str:
    """A plain aligned table of ``columns`` (attribute names) of ``rows``."""
    cells = [[_cell(getattr(row, column)) for column in columns] for row in rows]
    widths = [max([len(column), *(len(line[index]) for line in cells)]) for index, column in enumerate(columns)]
    lines = ["  ".join(name.upper().ljust(width) for name, width in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in cells]
    return "\n".join(lines)


def emit(ctx: Context, value: Any, columns: Sequence[str] | None = None, *, human: str | None = None) -> None:
    if ctx.json:
        click.echo(json.dumps(_plain(value), indent=2, sort_keys=False))
    elif human is not None:
        click.echo(human)
    elif columns is not None:
        rows = value if isinstance(value, list) else [value]
        click.echo(table(rows, columns) if rows else "(none)")
    else:
        click.echo(json.dumps(_plain(value), indent=2))


def progress(message: str) -> None:
    click.echo(message, err=True)


def fail(code: int, message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextmanager
def api_errors() -> Iterator[None]:
    """Every API error and an unreachable API become one line on stderr and a documented exit code."""
    try:
        yield
    except ApiError as error:
        fail(EXIT_API_ERROR, f"{error.status} {error.code}: {error.message}")
    except UnreachableError as error:
        fail(EXIT_UNREACHABLE, str(error))
    except WaitTimeout as error:
        fail(EXIT_TIMEOUT, str(error))


class FractalGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        with api_errors():
            return super().invoke(ctx)


@click.group(cls=FractalGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar="FRACTAL_ADMIN_URL",
    default=DEFAULT_ADMIN_URL,
    show_default=True,
    help="The admin API (env FRACTAL_ADMIN_URL).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--http-timeout", "http_timeout_s", default=10.0, show_default=True, help="Seconds per HTTP request.")
@click.pass_context
def main(ctx: click.Context, url: str, as_json: bool, http_timeout_s: float) -> None:
    """Operate a Fractal fleet through its admin API.

    Credentials come from FRACTAL_API_KEY (an API key) or FRACTAL_ADMIN_TOKEN (an admin JWT).
    Exit codes: 0 ok, 1 API error, 2 usage, 3 unreachable, 4 timeout.
    """
    credential = os.environ.get("FRACTAL_API_KEY") or os.environ.get("FRACTAL_ADMIN_TOKEN") or None
    ctx.obj = Context(url=url, credential=credential, json=as_json, http_timeout_s=http_timeout_s)


pass_context = click.make_pass_decorator(Context)

IMAGE_COLUMNS = (
    "region",
    "client_commit_hash",
    "active",
    "ami_id",
    "instance_type",
    "mandelbox_capacity",
    "target_free",
)
INSTANCE_COLUMNS = (
    "instance_name",
    "region",
    "client_commit_hash",
    "status",
    "live_mandelboxes",
    "mandelbox_capacity",
    "ip",
    "last_heartbeat_at",
)
CAPACITY_COLUMNS = (
    "region",
    "client_commit_hash",
    "active",
    "instances",
    "capacity",
    "used",
    "free",
    "target_free",
    "target_reason",
)
MANDELBOX_COLUMNS = ("mandelbox_id", "status", "user_id", "instance_name", "region", "created_at", "end_reason")
EVENT_COLUMNS = ("id", "created_at", "kind", "actor", "instance_name", "detail")
KEY_COLUMNS = ("id", "name", "scopes", "created_by", "created_at", "expires_at", "revoked_at", "last_used_at")


# images


@main.group()
def images() -> None:
    """Machine images per region and client version (publishing one rolls the fleet over to it)."""


@images.command("list")
@json_option
@pass_context
def images_list(ctx: Context) -> None:
    """Every image, by region."""
    emit(ctx, ctx.client.images(), IMAGE_COLUMNS)


@images.command("publish")
@click.argument("region")
@click.argument("client_commit_hash")
@click.option("--ami-id", required=True)
@click.option("--instance-type", required=True)
@click.option(
    "--capacity", "mandelbox_capacity", type=click.IntRange(1, 10_000), required=True, help="Mandelboxes per host."
)
@click.option("--target-free", type=click.IntRange(0), default=None, help="Free slots to keep (default: the fleet's).")
@click.option(
    "--buffer-policy",
    "buffer_policy_json",
    default=None,
    help='The buffer policy as JSON, e.g. \'{"kind": "demand", "floor": 2}\' (docs/simulation.md); default static.',
)
@wait_options("Show progress until the version's buffer is warm.")
@json_option
@pass_context
def images_publish(
    ctx: Context,
    region: str,
    client_commit_hash: str,
    ami_id: str,
    instance_type: str,
    mandelbox_capacity: int,
    target_free: int | None,
    buffer_policy_json: str | None,
    wait: bool,
    timeout_s: float,
    interval_s: float,
) -> None:
    """Publish (create or re-activate) the image of a client version: the scaler builds its buffer. This sets the
    whole image: a target or buffer policy not given is cleared."""
    buffer_policy = None
    if buffer_policy_json is not None:
        try:
            buffer_policy = json.loads(buffer_policy_json)
        except ValueError as error:
            raise click.BadParameter(f"not JSON: {error}", param_hint="--buffer-policy") from error
        if not isinstance(buffer_policy, dict):
            raise click.BadParameter("a JSON object is expected", param_hint="--buffer-policy")
    image = ctx.client.put_image(
        region,
        client_commit_hash,
        ami_id=ami_id,
        instance_type=instance_type,
        mandelbox_capacity=mandelbox_capacity,
        active=True,
        target_free=target_free,
        buffer_policy=buffer_policy,
    )
    if not ctx.json:
        progress(f"published {region}/{client_commit_hash} ({image.ami_id}, {image.mandelbox_capacity} per host)")
    if wait:
        wait_warm(ctx, region, client_commit_hash, timeout_s=timeout_s, interval_s=interval_s)
    emit(ctx, image, IMAGE_COLUMNS)


def warm_state(client: AdminClient, region: str, commit: str) -> tuple[bool, str]:
    """Is the version's buffer warm (ACTIVE hosts hold at least target_free free slots), and a progress line."""
    row: Capacity | None = next(
        (item for item in client.capacity() if item.region == region and item.client_commit_hash == commit), None
    )
    active = [
        host for host in client.iter_instances(region=region, status="ACTIVE") if host.client_commit_hash == commit
    ]
    booting = sum(
        1 for host in client.iter_instances(region=region, status="PRE_CONNECTION") if host.client_commit_hash == commit
    )
    free = sum(host.mandelbox_capacity - host.live_mandelboxes for host in active)
    target = row.target_free if row is not None else 0
    warm = row is not None and free >= target
    return warm, f"{free}/{target} free on {len(active)} ACTIVE host(s), {booting} booting"


def wait_warm(ctx: Context, region: str, commit: str, *, timeout_s: float, interval_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        warm, line = warm_state(ctx.client, region, commit)
        if line != last:
            progress(f"{region}/{commit}: {line}")
            last = line
        if warm:
            progress(f"{region}/{commit}: warm")
            return
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout_s:g} s: {region}/{commit} is not warm ({line})")
        time.sleep(interval_s)


@images.command("deactivate")
@click.argument("region")
@click.argument("client_commit_hash")
@json_option
@pass_context
def images_deactivate(ctx: Context, region: str, client_commit_hash: str) -> None:
    """Deactivate an image: its hosts drain and are terminated once empty."""
    current = next(
        (
            image
            for image in ctx.client.iter_images()
            if image.region == region and image.client_commit_hash == client_commit_hash
        ),
        None,
    )
    if current is None:
        fail(EXIT_API_ERROR, f"404 NOT_FOUND: no image {region}/{client_commit_hash}")
    image = ctx.client.put_image(
        region,
        client_commit_hash,
        ami_id=current.ami_id,
        instance_type=current.instance_type,
        mandelbox_capacity=current.mandelbox_capacity,
        active=False,
        target_free=current.target_free,
        buffer_policy=current.buffer_policy,
    )
    emit(ctx, image, IMAGE_COLUMNS)


# instances


@main.group()
def instances() -> None:
    """Hosts: list, register by hand, drain."""


@instances.command("list")
@click.option("--region")
@click.option("--status", type=click.Choice(INSTANCE_STATUSES, case_sensitive=False))
@json_option
@pass_context
def instances_list(ctx: Context, region: str | None, status: str | None) -> None:
    """Instances with live usage and last heartbeat."""
    emit(ctx, ctx.client.instances(region=region, status=status.upper() if status else None), INSTANCE_COLUMNS)


@instances.command("register")
@click.argument("instance_name")
@click.option("--region", required=True)
@click.option("--commit", "client_commit_hash", required=True, help="The client version it runs.")
@click.option("--capacity", "mandelbox_capacity", type=click.IntRange(1, 10_000), required=True)
@click.option("--ami-id")
@click.option("--instance-type")
@json_option
@pass_context
def instances_register(
    ctx: Context,
    instance_name: str,
    region: str,
    client_commit_hash: str,
    mandelbox_capacity: int,
    ami_id: str | None,
    instance_type: str | None,
) -> None:
    """Register a host by hand; prints its host secret (shown once)."""
    registered = ctx.client.register_instance(
        instance_name,
        region=region,
        client_commit_hash=client_commit_hash,
        mandelbox_capacity=mandelbox_capacity,
        ami_id=ami_id,
        instance_type=instance_type,
    )
    emit(
        ctx,
        registered,
        human=f"{registered.instance_name} {registered.status}\nhost secret (shown once): {registered.host_secret}",
    )


@instances.command("drain")
@click.argument("instance_name")
@wait_options("Show progress until the host is terminated.")
@json_option
@pass_context
def instances_drain(ctx: Context, instance_name: str, wait: bool, timeout_s: float, interval_s: float) -> None:
    """Drain a host: no new mandelboxes; the scaler terminates it once empty."""
    instance = ctx.client.drain(instance_name)
    if wait:
        instance = wait_gone(ctx, instance, timeout_s=timeout_s, interval_s=interval_s)
    emit(ctx, instance, INSTANCE_COLUMNS)


def wait_gone(ctx: Context, instance: Instance, *, timeout_s: float, interval_s: float) -> Instance:
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        line = f"{instance.status}, {instance.live_mandelboxes} live mandelbox(es)"
        if line != last:
            progress(f"{instance.instance_name}: {line}")
            last = line
        if instance.status == "TERMINATED":
            return instance
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout_s:g} s: {instance.instance_name} is {line}")
        time.sleep(interval_s)
        found = next(
            (
                item
                for item in ctx.client.iter_instances(region=instance.region)
                if item.instance_name == instance.instance_name
            ),
            None,
        )
        if found is None:  # no row is ever deleted, but a host that is not listed is gone all the same
            return instance
        instance = found


# capacity, mandelboxes, events, reconcile


@main.command()
@json_option
@pass_context
def capacity(ctx: Context) -> None:
    """Capacity per region and client version: instances by status, used, free against target."""
    emit(ctx, ctx.client.capacity(), CAPACITY_COLUMNS)


@main.group()
def mandelboxes() -> None:
    """Mandelboxes (newest first)."""


@mandelboxes.command("list")
@click.option("--user", "user_id")
@click.option("--status", type=click.Choice(MANDELBOX_STATUSES, case_sensitive=False))
@click.option("--instance", "instance_name")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True, help="At most this many.")
@json_option
@pass_context
def mandelboxes_list(
    ctx: Context, user_id: str | None, status: str | None, instance_name: str | None, limit: int
) -> None:
    """Mandelboxes, newest first."""
    rows = []
    for row in ctx.client.iter_mandelboxes(
        user_id=user_id,
        status=status.upper() if status else None,
        instance_name=instance_name,
        page_size=min(limit, 5000),
    ):
        rows.append(row)
        if len(rows) >= limit:
            break
    emit(ctx, rows, MANDELBOX_COLUMNS)


@main.group(invoke_without_command=True)
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True, help="How many of the newest.")
@click.option("--follow", "-f", is_flag=True, help="Then print new events as they happen (Ctrl-C stops).")
@click.option(
    "--interval",
    "interval_s",
    type=click.FloatRange(0.05),
    default=2,
    show_default=True,
    help="Seconds between polls with --follow.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0),
    default=None,
    help="Stop following after this many seconds (exit 0).",
)
@json_option
@pass_context
@click.pass_context
def events(
    click_ctx: click.Context, ctx: Context, limit: int, follow: bool, interval_s: float, timeout_s: float | None
) -> None:
    """The audit log: the newest events, oldest of them first; --follow keeps printing new ones.

    `fractal events export -o trace.csv [--days 7]` writes the sessions it records as a simulator trace."""
    if click_ctx.invoked_subcommand is not None:
        return
    newest = list(reversed(ctx.client.events(limit=limit)))
    print_events(ctx, newest, header=True)
    if not follow:
        return
    last_id = newest[-1].id if newest else 0
    deadline = time.monotonic() + timeout_s if timeout_s is not None else None
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(interval_s)
            fresh = ctx.client.events_after(last_id)
            if fresh:
                print_events(ctx, fresh, header=False)
                last_id = fresh[-1].id
    except KeyboardInterrupt:
        return


RFC3339 = click.DateTime(formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z"])


@events.command("export")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The CSV.")
@click.option("--days", type=click.FloatRange(min=0, min_open=True), default=7, show_default=True)
@click.option("--since", type=RFC3339, help="RFC 3339 with an offset (default: --days before --until).")
@click.option("--until", type=RFC3339, help="RFC 3339 with an offset (default: now).")
@click.option(
    "--database-url",
    help="Read this database's events table directly instead of the admin API (a replica, or a copy).",
)
@pass_context
def events_export(
    ctx: Context, output: Path, days: float, since: datetime | None, until: datetime | None, database_url: str | None
) -> None:
    """The sessions the audit log records, as a simulator trace CSV (`fractal simulate run --trace FILE`).

    Reads GET /admin/events (assigns, refusals, mandelbox status moves) page by page through the admin API;
    with --database-url, that database instead."""
    from fractal.simulation.trace import EXPORT_KINDS, AuditRecord, trace_from_events, write_csv

    if database_url is not None:
        from fractal.simulation.__main__ import main as simulation_main  # SQLAlchemy engine and friends

        window = [f"--{name}={value.isoformat()}" for name, value in (("since", since), ("until", until)) if value]
        raise SystemExit(
            simulation_main(["export", "-o", str(output), "--days", str(days), "--database-url", database_url, *window])
        )
    until = until or datetime.now(UTC)
    since = since or until - timedelta(days=days)
    newest_first = [
        AuditRecord(event.kind, event.actor, event.created_at, event.mandelbox_id, event.detail or {})
        for event in ctx.client.iter_events(page_size=1000, kinds=EXPORT_KINDS, since=since, until=until)
        if event.created_at is not None
    ]
    exported = trace_from_events(reversed(newest_first), until=until)
    write_csv(exported, output)
    click.echo(f"wrote {len(exported)} sessions ({since.isoformat()} .. {until.isoformat()}) to {output}")


# The simulator has its own argparse command line (python -m fractal.simulation); this hands it the arguments as
# they are, so `fractal simulate --help` is its help and nothing is parsed twice.
PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


@main.command(context_settings=PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def simulate(args: tuple[str, ...]) -> None:
    """What-if simulator (docs/simulation.md): `fractal simulate run --synthetic --compare static demand --plot
    sim.png`, `fractal simulate run --trace trace.csv ...`, `fractal simulate generate -o trace.csv`."""
    from fractal.simulation.__main__ import main as simulation_main

    raise SystemExit(simulation_main(list(args)))


def print_events(ctx: Context, rows: list[Any], *, header: bool) -> None:
    if ctx.json:  # one JSON document per line, so a follower can be piped into jq
        for row in rows:
            click.echo(json.dumps(_plain(row)))
        return
    if not rows:
        if header:
            click.echo("(none)")
        return
    text = table(rows, EVENT_COLUMNS)
    lines = text.splitlines()
    click.echo("\n".join(lines if header else lines[1:]))


@main.command()
@json_option
@pass_context
def reconcile(ctx: Context) -> None:
    """Run one scaler pass now and print what it did."""
    report = ctx.client.reconcile()
    if ctx.json:
        emit(ctx, report)
        return
    if not report.ran:
        click.echo(f"not run: {report.skipped_reason}")
        return
    click.echo(f"pass took {report.duration_s:.2f} s, {len(report.actions)} action(s)")
    for action in report.actions:
        click.echo(
            f"  {action.get('action')} {action.get('region') or ''} {action.get('client_commit_hash') or ''} "
            f"{action.get('instance_name') or ''}".rstrip()
        )
    for error in report.region_errors:
        click.echo(f"  error in {error.get('region')} ({error.get('operation')}): {error.get('message')}")


# API keys


@main.group()
def keys() -> None:
    """API keys for automation (scopes: admin:read, admin:write, images:write)."""


@keys.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, required=True, type=click.Choice(SCOPES), help="Repeat for several.")
@click.option(
    "--expires-at",
    type=click.DateTime(formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z"]),
    help="RFC 3339 with an offset, e.g. 2027-01-01T00:00:00+00:00.",
)
@json_option
@pass_context
def keys_create(ctx: Context, name: str, scopes: tuple[str, ...], expires_at: datetime | None) -> None:
    """Create a key; it is printed once (only its digest is stored)."""
    created = ctx.client.create_api_key(name, list(scopes), expires_at=expires_at)
    emit(
        ctx,
        {**_plain(created.api_key), "key": created.key},
        human=f"{created.api_key.id} {created.api_key.name} {','.join(created.api_key.scopes)}\n"
        f"key (shown once): {created.key}",
    )


@keys.command("list")
@json_option
@pass_context
def keys_list(ctx: Context) -> None:
    """Every key with its scopes and last use (revoked ones too)."""
    emit(ctx, ctx.client.api_keys(), KEY_COLUMNS)


@keys.command("revoke")
@click.argument("key_id")
@json_option
@pass_context
def keys_revoke(ctx: Context, key_id: str) -> None:
    """Revoke a key at once."""
    emit(ctx, ctx.client.revoke_api_key(key_id), KEY_COLUMNS)


if __name__ == "__main__":  # pragma: no cover
    main()
