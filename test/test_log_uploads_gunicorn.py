"""The host API under a real gunicorn (the test client never sets ``wsgi.input_terminated`` and never decodes paths
as gunicorn does): log limits are inclusive for Content-Length and chunked bodies alike, one byte more is 413 and
stores nothing; encoded dot segments and doubled slashes answer JSON, never a redirect."""

from __future__ import annotations

import http.client
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from sqlalchemy import select

from fractal.auth.dev_keys import DevKeyPair
from fractal.database import SessionFactory
from fractal.models import LogUpload, Mandelbox, MandelboxStatus
from test.factories import Factories
from test.processes import StartedProcess, start_gunicorn, wait_until_ready
from test.throwaway import free_port

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 64 * 1024
pytestmark = pytest.mark.slow


@pytest.fixture
def host_box(committed_factory: SessionFactory) -> tuple[uuid.UUID, str]:
    with committed_factory() as session:
        instance, secret = Factories(session).instance()
        mandelbox = Mandelbox(instance_name=instance.instance_name, user_id="u", status=MandelboxStatus.RUNNING)
        session.add(mandelbox)
        session.commit()
        return mandelbox.mandelbox_id, secret


@pytest.fixture
def bucket(moto_endpoint: str) -> str:
    name = f"logs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def gunicorn_host(
    database_url: str, keypair: DevKeyPair, moto_endpoint: str, bucket: str, tmp_path: Path
) -> Iterator[StartedProcess]:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FRACTAL_", "GUNICORN_"))}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        {
            "DATABASE_URL": database_url,
            "FRACTAL_ENV": "test",
            "FRACTAL_JWT_PUBLIC_KEY": keypair.public_pem,
            "FRACTAL_MAX_LOG_BYTES": str(LIMIT),
            "FRACTAL_LOGS_BUCKET": bucket,
            "FRACTAL_LOG_UPLOAD_RATE_LIMIT": "1000 per minute",
            "AWS_ENDPOINT_URL_S3": moto_endpoint,
            "GUNICORN_BIND": f"127.0.0.1:{port}",
            "GUNICORN_WORKERS": "1",
            "GUNICORN_THREADS": "2",
            "GUNICORN_GRACEFUL_TIMEOUT": "3",
        }
    )
    started = start_gunicorn("host_service_app:app", env, port=port, log_path=tmp_path / "gunicorn.log")
    try:
        wait_until_ready(started, timeout_s=60)
        yield started
    finally:
        started.stop()


def put(server: StartedProcess, path: str, secret: str, body: bytes, *, chunked: bool) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {secret}", "Content-Type": "text/plain"}
        if chunked:
            pieces = [body[i : i + 10_000] for i in range(0, len(body), 10_000)]
            connection.request("PUT", path, body=iter(pieces), headers=headers, encode_chunked=True)
        else:
            connection.request("PUT", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def stored(committed_factory: SessionFactory, mandelbox_id: uuid.UUID) -> list[int]:
    with committed_factory() as session:
        return sorted(session.scalars(select(LogUpload.size).where(LogUpload.mandelbox_id == mandelbox_id)).all())


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_the_limit_is_inclusive_under_gunicorn(
    gunicorn_host: StartedProcess,
    host_box: tuple[uuid.UUID, str],
    committed_factory: SessionFactory,
    chunked: bool,
) -> None:
    mandelbox_id, secret = host_box
    path = f"/host/mandelboxes/{mandelbox_id}/logs"
    status, body = put(gunicorn_host, path, secret, b"x" * LIMIT, chunked=chunked)
    assert status == 201, body
    status, body = put(gunicorn_host, path, secret, b"y" * (LIMIT + 1), chunked=chunked)
    assert status == 413 and b"PAYLOAD_TOO_LARGE" in body, body
    assert stored(committed_factory, mandelbox_id) == [LIMIT]


def test_encoded_dot_segments_are_json_404_under_gunicorn(gunicorn_host: StartedProcess) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", gunicorn_host.port, timeout=10)
    try:
        for path in ("/host/mandelboxes/%2e%2e%2f%2e%2e%2fhealthz", "/host/mandelboxes/x%2f%2fy", "//host/heartbeat"):
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            assert response.status in (404, 405), (path, response.status, body[:200])  # JSON either way
            assert response.getheader("Location") is None
            assert body.startswith(b'{"error":')
    finally:
        connection.close()


def test_an_early_413_closes_the_connection(gunicorn_host: StartedProcess, host_box: tuple[uuid.UUID, str]) -> None:
    mandelbox_id, secret = host_box
    # gunicorn would otherwise try to drain the announced body for up to 5 s (a worker thread held per such request)
    # and only then close: the 3 s socket timeout tells the two apart.
    with socket.create_connection(("127.0.0.1", gunicorn_host.port), timeout=3) as sock:
        # A client announcing a body far over the limit and waiting for 100-continue before sending it (curl does).
        sock.sendall(
            (
                f"PUT /host/mandelboxes/{mandelbox_id}/logs HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {secret}\r\nContent-Length: {LIMIT * 100}\r\n"
                "Expect: 100-continue\r\n\r\n"
            ).encode()
        )
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break  # the server closed the connection after its answer
            received += chunk
    # (gunicorn may answer "100 Continue" first.) Had the connection stayed open, recv would have waited for the
    # socket timeout and raised instead of seeing the end.
    assert b"HTTP/1.1 413 " in received and b"PAYLOAD_TOO_LARGE" in received, received[:400]
