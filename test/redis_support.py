"""Helpers for tests on real Redis: per-test key prefixes, throwaway servers, app replicas in other processes."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from test.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER_URL = os.environ.get("FRACTAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unique_prefix() -> str:
    """A key prefix no other test (or other helper's run on the same server) uses."""
    return f"fractal-test:{os.getpid()}:{uuid.uuid4().hex[:8]}:"


def delete_prefixed(url: str, prefix: str) -> int:
    """Delete only this prefix's keys (the server is shared: never FLUSHDB)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        return client.delete(*keys) if keys else 0
    finally:
        client.close()


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a process we started, by its pid: TERM, then KILL after 5 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextmanager
def throwaway_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of our own on a free loopback port (so a test may stop it); yields (url, process)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="fractal-redis-")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        client.close()
        yield url, process
    finally:
        stop_process(process)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def app_replica(env: dict[str, str], *, log_path: Path) -> Iterator[str]:
    """Start test/serve_app.py in another process with ``env``; yields its base URL; stopped by pid."""
    full_env = {**os.environ, **env}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "test.serve_app"], cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=log
        )
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], 30)
            line = process.stdout.readline() if ready else b""
            if not line.strip().isdigit():
                raise RuntimeError(f"replica did not start: {log_path.read_text(errors='replace')[-2000:]}")
            yield f"http://127.0.0.1:{int(line)}"
        finally:
            stop_process(process)
