"""A whole deployment on loopback from the real parts: PgBouncer (transaction pooling) in front of Postgres, N
gunicorn replicas of each API started by env.py as a container would, nginx in front of them, scaler processes.

Shared by test/test_deployment.py, test/test_scaler_lease_processes.py and bench/deployment.py. Everything binds
127.0.0.1 on free ports, lives in one temporary directory and is stopped by pid (children first, then the
proxies), even when start-up fails half way.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy.engine import make_url

from fractal.cloud.host_agent import HostAgent
from test.processes import StartedProcess, start_sequence, wait_until_ready
from test.servers import wait_for_port
from test.throwaway import PG_SERVER_URL, create_database, database_name, drop_database, free_port

API_ROLES = ("public", "admin", "host")


def debian_binary(name: str) -> str | None:
    """A Debian daemon's binary (in /usr/sbin, often outside a non-root PATH); None when not installed."""
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}",) if os.access(p, os.X_OK)), None)


def _run_as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _stop_pid(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 10) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


# --- PgBouncer ------------------------------------------------------------------------------------------------


@dataclass
class PgBouncer:
    """A PgBouncer in transaction-pooling mode in front of one Postgres server."""

    process: subprocess.Popen[bytes]
    port: int
    directory: Path
    pool_size: int
    user: str

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on PgBouncer's admin console (POOLS, SERVERS, CLIENTS, STATS, ...)."""
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, dbname="pgbouncer", user=self.user)
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"SHOW {what}")
                names = [column.name for column in cursor.description or []]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            connection.close()

    def log_text(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        _stop_pid(self.process, signal.SIGINT)  # SIGINT: PgBouncer's safe shutdown


def start_pgbouncer(
    directory: Path, *, server_url: str = PG_SERVER_URL, pool_size: int = 4, max_client_conn: int = 500
) -> PgBouncer:
    """Debian's pgbouncer in the foreground on a free port, for every database of ``server_url``'s server.

    ``pool_size`` (default_pool_size) server connections per database and user: with a small one, the replicas'
    many client connections really share a few server connections. Trust auth, as the test server has.
    """
    binary = debian_binary("pgbouncer")
    if binary is None:
        raise RuntimeError("pgbouncer is not installed (./commands test installs Debian's package)")
    upstream = make_url(server_url)
    user = upstream.username or "postgres"
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "userlist.txt").write_text(f'"{user}" ""\n')
    config = directory / "pgbouncer.ini"
    config.write_text(
        PGBOUNCER_INI.format(
            host=upstream.host or "127.0.0.1",
            upstream_port=upstream.port or 5432,
            port=port,
            directory=directory,
            pool_size=pool_size,
            max_client_conn=max_client_conn,
            user=user,
        )
    )
    argv = [binary, str(config)]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        shutil.chown(directory, "postgres", "postgres")
        for path in directory.iterdir():
            shutil.chown(path, "postgres", "postgres")
        argv = [binary, "-u", "postgres", str(config)]
    output = (directory / "stdout.log").open("wb")
    process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
    bouncer = PgBouncer(process=process, port=port, directory=directory, pool_size=pool_size, user=user)
    try:
        wait_for_port(port, timeout_s=15)
    except TimeoutError:
        bouncer.stop()
        raise RuntimeError(f"pgbouncer did not start:\n{bouncer.log_text()}") from None
    return bouncer


# What an operator sets (README "More than one machine"); the rest is loopback plumbing for the test.
PGBOUNCER_INI = """\
[databases]
* = host={host} port={upstream_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
pidfile = {directory}/pgbouncer.pid
logfile = {directory}/pgbouncer.log
auth_type = trust
auth_file = {directory}/userlist.txt
admin_users = {user}
stats_users = {user}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {max_client_conn}
max_db_connections = {pool_size}
server_reset_query = DISCARD ALL
server_reset_query_always = 0
server_check_query = select 1
query_wait_timeout = 30
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
"""


# --- nginx ----------------------------------------------------------------------------------------------------


@dataclass
class Nginx:
    """nginx in front of the replicas: one listening port per API, round robin over that API's replicas."""

    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    directory: Path

    def url(self, role: str) -> str:
        return f"http://127.0.0.1:{self.ports[role]}"

    def log_text(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        _stop_pid(self.process, signal.SIGQUIT)  # graceful: the master stops its workers, then itself


def start_nginx(directory: Path, upstreams: dict[str, list[int]], ports: dict[str, int] | None = None) -> Nginx:
    """Debian's nginx in the foreground (``daemon off``), pid, logs and temp files in ``directory``.

    Each response carries ``X-Upstream`` (the replica that answered), so a test can see both replicas served.
    nginx passes the client's address in ``X-Forwarded-For`` (appended: one trusted proxy) and the scheme in
    ``X-Forwarded-Proto``; it never retries a POST on another replica (non-idempotent requests are not retried
    unless ``proxy_next_upstream non_idempotent`` is set).
    """
    binary = debian_binary("nginx")
    if binary is None:
        raise RuntimeError("nginx is not installed (./commands test installs Debian's package)")
    ports = ports or {role: free_port() for role in upstreams}
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    servers = "\n".join(
        NGINX_SERVER.format(
            role=role,
            port=ports[role],
            replicas="\n".join(f"        server 127.0.0.1:{port};" for port in replica_ports),
        )
        for role, replica_ports in upstreams.items()
    )
    config = directory / "nginx.conf"
    user = "user nobody nogroup;" if os.geteuid() == 0 else ""
    config.write_text(NGINX_CONF.format(directory=directory, servers=servers, user=user))
    output = (directory / "stdout.log").open("wb")
    process = subprocess.Popen(
        [binary, "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")],
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    nginx = Nginx(process=process, ports=ports, directory=directory)
    try:
        for port in ports.values():
            wait_for_port(port, timeout_s=15)
    except TimeoutError:
        nginx.stop()
        raise RuntimeError(f"nginx did not start:\n{nginx.log_text()}") from None
    return nginx


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
{servers}
}}
"""

NGINX_SERVER = """\
    upstream {role} {{
{replicas}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{role};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
"""


# --- the whole deployment -------------------------------------------------------------------------------------


@dataclass
class Deployment:
    """Everything started by ``deployment()``; processes talk to Postgres only through PgBouncer."""

    database: str
    database_url: str  # straight to Postgres: for the test's own checks (pg_locks, pg_stat_activity)
    pooled_url: str  # through PgBouncer: what every process of the deployment uses
    pgbouncer: PgBouncer
    nginx: Nginx
    apis: dict[str, list[StartedProcess]]
    scalers: list[StartedProcess]
    env: dict[str, str]
    directory: Path
    _extra: list[StartedProcess] = field(default_factory=list)

    def url(self, role: str) -> str:
        """The API behind nginx."""
        return self.nginx.url(role)

    def start_scaler(self, **env: str) -> StartedProcess:
        """One more scaler process (env.py, FRACTAL_APP=scaler) on the same settings; stopped with the rest."""
        scaler = _start_scaler(self.pooled_url, self.directory, len(self.scalers) + len(self._extra), self.env, env)
        self._extra.append(scaler)
        return scaler

    def processes(self) -> list[StartedProcess]:
        return [*self.scalers, *self._extra, *(p for replicas in self.apis.values() for p in replicas)]


def _start_scaler(
    pooled_url: str, directory: Path, index: int, base: dict[str, str], extra: dict[str, str]
) -> StartedProcess:
    env = {"FRACTAL_SCALER_HEALTH_FILE": str(directory / f"scaler-{index}.health"), **base, **extra}
    return start_sequence("scaler", pooled_url, directory, **env)


@contextlib.contextmanager
def deployment(
    env: dict[str, str],
    *,
    replicas: int = 2,
    scalers: int = 2,
    roles: tuple[str, ...] = API_ROLES,
    pool_size: int = 4,
    workers: int = 1,
    threads: int = 4,
    db_pool_size: int = 4,
    db_max_overflow: int = 4,
    ready_timeout_s: float = 90,
) -> Iterator[Deployment]:
    """Start PgBouncer, an empty database, ``replicas`` of each API and ``scalers`` scaler processes at once (all
    migrating through PgBouncer), then nginx in front of the APIs. ``env`` is every process's environment on top
    of the test's (Fractal settings, Redis, AWS); DATABASE_URL, the gunicorn sizes, the pool sizes,
    FRACTAL_TRUSTED_PROXIES=1 and FRACTAL_HOST_API_URL (nginx's host API) are set here. Stops everything after.
    """
    directory = Path(tempfile.mkdtemp(prefix="fractal-deploy-"))
    directory.chmod(0o755)  # PgBouncer runs as postgres, nginx's workers as nobody: both need to reach their dirs
    name = database_name("fractal_deploy")
    started: list[StartedProcess] = []
    bouncer: PgBouncer | None = None
    nginx: Nginx | None = None
    created = False
    try:
        bouncer = start_pgbouncer(directory / "pgbouncer", pool_size=pool_size)
        # Empty: the processes migrate it through PgBouncer. A libpq URL (psycopg2.connect takes it as it is).
        database_url = make_url(create_database(PG_SERVER_URL, name)).set(drivername="postgresql")
        database_url = database_url.render_as_string(hide_password=False)
        created = True
        pooled_url = bouncer.url(name)
        nginx_ports = {role: free_port() for role in roles}
        process_env = {
            "FRACTAL_TRUSTED_PROXIES": "1",
            "GUNICORN_WORKERS": str(workers),
            "GUNICORN_THREADS": str(threads),
            "FRACTAL_DB_POOL_SIZE": str(db_pool_size),
            "FRACTAL_DB_MAX_OVERFLOW": str(db_max_overflow),
            "FRACTAL_DB_WAIT_TIMEOUT_S": "30",
            **({"FRACTAL_HOST_API_URL": f"http://127.0.0.1:{nginx_ports['host']}"} if "host" in roles else {}),
            **env,
        }
        apis: dict[str, list[StartedProcess]] = {}
        for role in roles:
            apis[role] = [start_sequence(role, pooled_url, directory, **process_env) for _ in range(replicas)]
            started += apis[role]
        scaler_processes = [_start_scaler(pooled_url, directory, i, process_env, {}) for i in range(scalers)]
        started += scaler_processes
        for process in started:
            if process in scaler_processes:
                continue
            wait_until_ready(process, timeout_s=ready_timeout_s)
        nginx = start_nginx(
            directory / "nginx", {role: [p.port for p in apis[role]] for role in roles}, ports=nginx_ports
        )
        result = Deployment(
            database=name,
            database_url=database_url,
            pooled_url=pooled_url,
            pgbouncer=bouncer,
            nginx=nginx,
            apis=apis,
            scalers=scaler_processes,
            env=process_env,
            directory=directory,
        )
        try:
            yield result
        finally:
            started = result.processes()
    finally:
        stop_all(started)
        if nginx is not None:
            nginx.stop()
        if bouncer is not None:
            bouncer.stop()
        if created:
            drop_database(PG_SERVER_URL, name)
        shutil.rmtree(directory, ignore_errors=True)


def stop_all(processes: list[StartedProcess], timeout_s: float = 10) -> None:
    """SIGTERM every process at once (a SIGSTOPped one is continued first), then wait for each (SIGKILL if one
    lingers): gunicorn's graceful shutdowns then overlap instead of adding up."""
    for started in processes:
        if started.process.poll() is None:
            with contextlib.suppress(OSError):
                if _is_stopped(started.process.pid):
                    os.kill(started.process.pid, signal.SIGCONT)
                started.process.send_signal(signal.SIGTERM)
    for started in processes:
        with contextlib.suppress(Exception):
            started.stop(timeout_s=timeout_s)


def _is_stopped(pid: int) -> bool:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] == "T"
    return False


# --- clients --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    headers: dict[str, str]

    @property
    def upstream(self) -> str | None:
        """The replica nginx passed the request to."""
        return self.headers.get("x-upstream")

    @property
    def error(self) -> str | None:
        return self.body.get("error") if isinstance(self.body, dict) else None


def call(
    method: str,
    url: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    source: str | None = None,
    timeout_s: float = 30,
) -> Answer:
    """One HTTP request with a JSON body, optionally from another loopback address (``source``, e.g. 127.0.0.2:
    nginx then sees another client)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(
        parts.hostname or "127.0.0.1",
        parts.port,
        timeout=timeout_s,
        source_address=(source, 0) if source else None,
    )
    try:
        payload = None if body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **(headers or {})} if payload is not None else dict(headers or {})
        connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), payload, sent)
        response = connection.getresponse()
        raw = response.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return Answer(response.status, parsed, {k.lower(): v for k, v in response.getheaders()})
    finally:
        connection.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- EC2 on moto ----------------------------------------------------------------------------------------------


def ec2_hosts(ec2: Any, commit: str, states: tuple[str, ...] = ("pending", "running")) -> dict[str, dict[str, Any]]:
    """instance id → moto's description, of the hosts launched for ``commit`` in the given states."""
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": "tag:fractal:client-commit-hash", "Values": [commit]},
            {"Name": "instance-state-name", "Values": list(states)},
        ]
    )
    return {i["InstanceId"]: i for page in pages for r in page["Reservations"] for i in r["Instances"]}


def tag(instance: dict[str, Any], key: str) -> str | None:
    return next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == key), None)


def host_environment(ec2: Any, instance_id: str) -> dict[str, str]:
    """What the scaler told a launched host in its user data (instance name, secret, host API, capacity)."""
    data = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    script = base64.b64decode(data["UserData"]["Value"]).decode()
    found: dict[str, str] = {}
    for line in script.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("FRACTAL_"):
            found[key] = shlex.split(value)[0]
    return found


def agent_for(ec2: Any, instance: dict[str, Any], *, host_api_url: str | None = None) -> HostAgent:
    """The reference host agent a launched EC2 host would run, from its user data (host API: nginx's, unless
    ``host_api_url`` names another)."""
    env = host_environment(ec2, instance["InstanceId"])
    return HostAgent(
        host_api_url or env["FRACTAL_HOST_API_URL"],
        instance_name=env["FRACTAL_INSTANCE_NAME"],
        host_secret=env["FRACTAL_HOST_SECRET"],
        ip=instance.get("PrivateIpAddress") or "10.0.0.1",
        client_commit_hash=env["FRACTAL_CLIENT_COMMIT_HASH"],
        mandelbox_capacity=int(env["FRACTAL_MANDELBOX_CAPACITY"]),
    )
