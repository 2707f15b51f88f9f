"""Helpers for tests on real Redis: per-test key prefixes, throwaway servers and clusters, app replicas in other
processes."""

from __future__ import annotations

import ipaddress
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from cachelib import RedisCache

from fractal.cache import DataCache
from fractal.database import SessionFactory
from fractal.images import IMAGES_CACHE_NAMESPACE
from fractal.models import Image, Instance, InstanceStatus
from fractal.redis_client import connect
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
def throwaway_redis(port: int | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of our own on a free loopback port, or on ``port`` (to stand in for a stopped one), so a test
    may stop it; yields (url, process)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    port = port or free_port()
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


@dataclass
class ThrowawayCluster:
    """A Redis Cluster of our own: its ``redis+cluster://`` URL (``rediss+cluster://`` when it speaks only TLS,
    with ``ca_file`` the CA that signed its certificate), its masters' ports and their processes."""

    url: str
    ports: list[int]
    processes: list[subprocess.Popen[bytes]]
    ca_file: str | None = None

    def node(self, port: int) -> redis.Redis[bytes]:
        """A plain client on one master (to look at what that node holds)."""
        tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": self.ca_file} if self.ca_file else {}
        return redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=1, **tls)

    def state(self, port: int) -> str:
        """cluster_state as ``port`` sees it (``ok`` or ``fail``)."""
        client = self.node(port)
        try:
            return str(client.cluster("info").get("cluster_state"))
        finally:
            client.close()

    def wait_for_state(self, wanted: str, *, ports: list[int] | None = None, timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        for port in ports or self.ports:
            while self.state(port) != wanted:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {port} did not reach cluster_state:{wanted}")
                time.sleep(0.05)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def write_loopback_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate it signed for 127.0.0.1 (and localhost): (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: Any, *, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fractal test CA")])
    ca_cert = certificate("fractal test CA", ca_key, ca_name, ca_key, ca=True)
    server_cert = certificate("127.0.0.1", server_key, ca_name, ca_key, ca=False)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


@contextmanager
def throwaway_redis_cluster(
    *, masters: int = 3, node_timeout_ms: int = 1000, tls: bool = False
) -> Iterator[ThrowawayCluster]:
    """``masters`` cluster-enabled redis-servers on loopback joined by ``redis-cli --cluster create`` (no replicas);
    yields once every node says cluster_state:ok. A short node timeout lets a stopped master fail the cluster soon.
    ``tls``: the nodes speak only TLS, to clients and to each other (``--port 0``, ``--tls-cluster yes``), with a
    certificate from a throwaway CA. Every server is stopped by pid afterwards."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise RuntimeError("redis-server / redis-cli are not installed")
    workdir = tempfile.mkdtemp(prefix="fractal-redis-cluster-")
    ports = [_cluster_port() for _ in range(masters)]
    processes: list[subprocess.Popen[bytes]] = []
    ca_file: str | None = None
    cli_tls: list[str] = []
    try:
        if tls:
            ca, cert, key = write_loopback_certificates(Path(workdir))
            ca_file, cli_tls = str(ca), ["--tls", "--cacert", str(ca)]
        for port in ports:
            listen = (
                ["--port", "0", "--tls-port", str(port), "--tls-cluster", "yes", "--tls-cert-file", str(cert),
                 "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
                if tls else ["--port", str(port)]
            )  # fmt: skip
            processes.append(
                subprocess.Popen(
                    [server, *listen, "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-config-file", f"{workdir}/nodes-{port}.conf",
                     "--cluster-node-timeout", str(node_timeout_ms), "--save", "", "--appendonly", "no",
                     "--dir", workdir, "--daemonize", "no"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        nodes = ",".join(f"127.0.0.1:{port}" for port in ports)
        url = f"rediss+cluster://{nodes}?ssl_ca_certs={ca_file}" if tls else f"redis+cluster://{nodes}"
        cluster = ThrowawayCluster(url=url, ports=ports, processes=processes, ca_file=ca_file)
        deadline = time.monotonic() + 10
        for port in ports:
            client = cluster.node(port)
            while True:
                try:
                    client.ping()
                    break
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            client.close()
        subprocess.run(
            [cli, *cli_tls, "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports), "--cluster-replicas",
             "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )  # fmt: skip
        cluster.wait_for_state("ok")
        yield cluster
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)  # a test may have left one stopped
            stop_process(process)
        shutil.rmtree(workdir, ignore_errors=True)


def replica_env(
    *, database_url: str, redis_url: str, prefix: str, public_pem: str, assign_limit: int
) -> dict[str, str]:
    """The environment of the app replicas the shared-Redis tests start (single server or cluster alike)."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "FRACTAL_REDIS_PREFIX": prefix,
        "FRACTAL_ENV": "test",
        "FRACTAL_JWT_PUBLIC_KEY": public_pem,
        "FRACTAL_ASSIGN_RATE_LIMIT": f"{assign_limit} per minute",
        "FRACTAL_CACHE_TTL_S": "300",  # far longer than the tests: only invalidation can explain fresh reads
        "FRACTAL_MAX_MANDELBOXES_PER_USER": "100",
        "FRACTAL_LOG_LEVEL": "WARNING",
    }


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


def call(
    base: str, method: str, path: str, *, token: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """One JSON request to a replica: (status, headers, body)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        base + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read() or b"null")


def seed_shared_fleet(factory: SessionFactory, *, redis_url: str, prefix: str) -> None:
    """Committed rows replicas can see: an active image and one roomy ACTIVE instance (``i-shared``, 50 slots) in
    us-east-1. Rows written behind the API's back are invalidated by hand (on ``redis_url``, one server or a
    cluster), as an operator script would have to."""
    with factory() as session:
        session.add(
            Image(
                region="us-east-1",
                client_commit_hash="abc123",
                ami_id="ami-1",
                active=True,
                instance_type="g4dn.xlarge",
                mandelbox_capacity=50,
            )
        )
        session.add(
            Instance(
                instance_name="i-shared",
                region="us-east-1",
                client_commit_hash="abc123",
                ami_id="ami-1",
                instance_type="g4dn.xlarge",
                ip="10.0.0.9",
                mandelbox_capacity=50,
                live_mandelboxes=0,
                status=InstanceStatus.ACTIVE,
                host_secret_hash="0" * 64,
            )
        )
        session.commit()
    client = connect(redis_url, socket_timeout=2)
    try:
        cache = DataCache(RedisCache(host=client, key_prefix=f"{prefix}cache:"), ttl_s=300)
        assert cache.invalidate(IMAGES_CACHE_NAMESPACE)
    finally:
        client.close()
