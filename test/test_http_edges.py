"""Requests a real gunicorn refuses before the app, and paths the app might "clean up": JSON in the contract's
shape every time, and never a redirect. Runs against the stack of env.py-started shells (real gunicorn)."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest

from test.processes import Stack

pytestmark = pytest.mark.slow


def raw(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` bytes as they are; answer (status, headers, body)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def get(path: str, *extra: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: localhost", *extra, "Connection: close", "", ""])).encode()


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (get("/regions", "Authorization: Bearer " + "x" * 10_000), 431, "HEADERS_TOO_LARGE"),
        (get("/regions?" + "q" * 9_000), 414, "URI_TOO_LONG"),
        (
            b"POST /mandelbox/assign HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\nConnection: close\r\n\r\n",
            400,
            "VALIDATION_ERROR",
        ),
    ],
    ids=["huge-header", "huge-path", "bad-content-length"],
)
def test_server_level_refusals_are_json(three_shells: Stack, request_bytes: bytes, status: int, code: str) -> None:
    answer_status, headers, body = raw(three_shells.public.url, request_bytes)
    assert answer_status == status
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    parsed = json.loads(body)
    assert parsed["error"] == code and parsed["message"]
    assert b"x" * 100 not in body  # nothing of the request is echoed


@pytest.mark.parametrize("path", ["/mandelbox/%2e%2e%2f", "/mandelbox/..%2f..%2fadmin", "//regions", "/regions/"])
def test_odd_paths_are_never_redirected(three_shells: Stack, path: str) -> None:
    status, headers, body = raw(three_shells.public.url, get(path))
    assert not 300 <= status < 400, (status, headers.get("location"))
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"] in {"NOT_FOUND", "UNAUTHORIZED"}
