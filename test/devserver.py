"""`./commands run` as a test process: the development server in a fresh directory on the embedded defaults.

Nothing of the caller's FRACTAL_*/DATABASE_URL/REDIS_URL leaks in, so what runs is what a newcomer gets: SQLite
under ./instance, the in-process cache and the simulated cloud. Stopped by pid.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fractal.auth.dev_keys import mint_token
from test.servers import free_port, wait_for_port

APIS = ("public", "admin", "host")


@dataclass
class DevServer:
    directory: Path
    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    token: str
    admin_token: str

    def url(self, api: str) -> str:
        return f"http://127.0.0.1:{self.ports[api]}"

    def output(self) -> str:
        return (self.directory / "devserver.out").read_text(errors="replace")

    def user_token(self, user_id: str) -> str:
        """A token for another user, signed by the development key the server generated."""
        private_pem = (self.directory / "instance" / "dev_jwt_private.pem").read_text()
        return mint_token(private_pem, user_id=user_id)

    def call(
        self, api: str, method: str, path: str, token: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url(api) + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url("admin") + "/metrics", timeout=10) as response:
            return str(response.read().decode())


@contextmanager
def running_devserver(directory: Path, **env: str) -> Iterator[DevServer]:
    """Start `python -m fractal.devserver` in ``directory`` (extra settings in ``env``); stop it afterwards and
    check it exited cleanly."""
    ports = {api: free_port() for api in APIS}
    clean = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FRACTAL_") and key not in ("DATABASE_URL", "REDIS_URL")
    }
    clean.update(
        FRACTAL_PUBLIC_PORT=str(ports["public"]),
        FRACTAL_ADMIN_PORT=str(ports["admin"]),
        FRACTAL_HOST_PORT=str(ports["host"]),
        FRACTAL_HOST_API_URL=f"http://127.0.0.1:{ports['host']}",
        FRACTAL_LOCAL_BOOT_DELAY_S="0.2",
        FRACTAL_LOG_JSON="true",
        **env,
    )
    output = (directory / "devserver.out").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "fractal.devserver"], cwd=directory, env=clean, stdout=output, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 90  # generous: a loaded 2-core CI machine migrates SQLite slowly
        while True:  # the welcome text with the tokens follows the servers' start
            printed = (directory / "devserver.out").read_text()
            token = re.search(r"export TOKEN=(\S+)", printed)
            admin_token = re.search(r"export ADMIN_TOKEN=(\S+)", printed)
            if token and admin_token:
                for port in ports.values():
                    wait_for_port(port, timeout_s=10)
                break
            assert time.monotonic() < deadline and process.poll() is None, printed
            time.sleep(0.1)
        yield DevServer(directory, process, ports, token.group(1), admin_token.group(1))
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        output.close()
    assert process.returncode == 0, (directory / "devserver.out").read_text()[-3000:]
