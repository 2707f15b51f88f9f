"""Helpers for tests that run real processes: free ports, the start sequence (env.py), a delayed TCP proxy.

Everything binds 127.0.0.1, is bounded in time and is stopped by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from sqlalchemy.engine import make_url

from test.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class StartedProcess:
    """A process launched by a test, its port and its captured stderr."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 15) -> int | None:
        """SIGTERM by pid (gunicorn stops gracefully), SIGKILL if it lingers; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._log.close()
        return self.process.returncode


def start_gunicorn(app: str, env: dict[str, str], *, port: int, log_path: Path) -> StartedProcess:
    """gunicorn with the repository's gunicorn.conf.py serving ``app`` (``"app:app"``), configured by ``env`` only
    (it must carry GUNICORN_BIND for ``port``); output captured in ``log_path``. Stop it with ``.stop()``."""
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), app],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return StartedProcess(process=process, port=port, log_path=log_path, _log=log)


def start_sequence(
    role: str,
    database_url: str,
    log_dir: Path,
    *,
    python: str = sys.executable,
    app_dir: Path = ROOT,
    base_env: dict[str, str] | None = None,
    **env: str,
) -> StartedProcess:
    """Run `python env.py` as the container would, serving ``role`` on a free loopback port.

    By default the checkout's env.py under the test venv; ``python``, ``app_dir`` and ``base_env`` run another
    installation (the wheel-layout test: a venv outside the checkout and the image's /app files).
    """
    port = free_port()
    source = os.environ if base_env is None else base_env
    child_env = {key: value for key, value in source.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    child_env.update(
        {
            "FRACTAL_APP": role,
            "DATABASE_URL": database_url,
            "GUNICORN_BIND": f"127.0.0.1:{port}",
            "GUNICORN_WORKERS": "1",
            "GUNICORN_THREADS": "2",
            "GUNICORN_GRACEFUL_TIMEOUT": "3",
            "FRACTAL_DB_WAIT_TIMEOUT_S": "30",
            "PYTHONUNBUFFERED": "1",
        }
    )
    child_env.update(env)
    log_path = log_dir / f"{role}-{port}.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [python, str(app_dir / "env.py")], cwd=app_dir, env=child_env, stdout=log, stderr=subprocess.STDOUT
    )
    return StartedProcess(process=process, port=port, log_path=log_path, _log=log)


def http_get(url: str, timeout_s: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_until_ready(started: StartedProcess, *, timeout_s: float = 60) -> None:
    """Poll /readyz until it answers 200; fail with the process's log if it dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if started.process.poll() is not None:
            raise AssertionError(f"process exited with {started.process.returncode}:\n{started.log_text()}")
        with contextlib.suppress(OSError):
            status, _ = http_get(started.url + "/readyz", timeout_s=2)
            if status == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"{started.url}/readyz not ready after {timeout_s}s:\n{started.log_text()}")


class TcpProxy:
    """A loopback TCP forwarder to ``upstream``; start() it late to simulate a database that comes up late."""

    def __init__(self, listen_port: int, upstream: tuple[str, int]) -> None:
        self.listen_port = listen_port
        self.upstream = upstream
        self._server: socket.socket | None = None
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.listen_port))
        server.listen(64)
        server.settimeout(0.2)
        self._server = server
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self._stopping.set()
        for sock in [*self._sockets, *([self._server] if self._server else [])]:
            with contextlib.suppress(OSError):
                sock.close()


@dataclass
class Stack:
    """The three APIs started by env.py at once against one fresh, empty database."""

    public: StartedProcess
    admin: StartedProcess
    host: StartedProcess
    database_url: str
    password: str
    public_metrics_port: int

    @property
    def shells(self) -> list[StartedProcess]:
        return [self.public, self.admin, self.host]


@pytest.fixture(scope="session")
def three_shells(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Public, admin and host shells launched together on an empty database (development settings, dev key)."""
    from fractal.auth.dev_keys import ensure_dev_keypair
    from fractal.config import DEV_PRIVATE_KEY_PATH, DEV_PUBLIC_KEY_PATH
    from test.conftest import PG_SERVER_URL, create_database, drop_database

    # Generated once here, not by three servers racing to create it.
    ensure_dev_keypair(ROOT / DEV_PRIVATE_KEY_PATH, ROOT / DEV_PUBLIC_KEY_PATH)
    name = f"fractal_stack_{uuid.uuid4().hex[:8]}"
    password = "pw-" + uuid.uuid4().hex  # trust auth ignores it; the logs are checked for it
    url = make_url(create_database(PG_SERVER_URL, name)).set(password=password)
    database_url = url.render_as_string(hide_password=False)
    log_dir = tmp_path_factory.mktemp("stack")
    env = {"FRACTAL_ENV": "development", "FRACTAL_CLOUD": "local"}
    metrics_port = free_port()
    shells = [
        start_sequence(
            role,
            database_url,
            log_dir,
            **env,
            **({"FRACTAL_METRICS_PORT": str(metrics_port)} if role == "public" else {}),
        )
        for role in ("public", "admin", "host")
    ]
    try:
        for shell in shells:
            wait_until_ready(shell, timeout_s=90)
        yield Stack(*shells, database_url=database_url, password=password, public_metrics_port=metrics_port)
    finally:
        for shell in shells:
            shell.stop()
        drop_database(PG_SERVER_URL, name)


@contextlib.contextmanager
def stopping(*processes: StartedProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for started in processes:
            started.stop()
