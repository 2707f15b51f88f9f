"""gunicorn's own error answers in Fractal's JSON shape.

Some requests never reach the app: gunicorn refuses a request line over ``limit_request_line`` (414), headers over
``limit_request_field_size`` (431), a malformed request or ``Content-Length`` (400), and answers with an HTML page.
Clients branch on ``{"error", "message"}`` everywhere, so gunicorn.conf.py installs this writer in every worker.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from fractal.errors import ErrorCode

CODES: dict[int, ErrorCode] = {
    400: ErrorCode.VALIDATION_ERROR,
    403: ErrorCode.FORBIDDEN,
    414: ErrorCode.URI_TOO_LONG,
    417: ErrorCode.VALIDATION_ERROR,
    431: ErrorCode.HEADERS_TOO_LARGE,
    501: ErrorCode.VALIDATION_ERROR,
}
MESSAGES: dict[int, str] = {
    400: "The HTTP request is malformed.",
    403: "The request is not allowed.",
    414: "The request line (path and query) is too long.",
    417: "The Expect header is not supported.",
    431: "A request header is too large.",
    501: "The request method is not supported.",
}


def json_error_page(status: int, reason: str) -> bytes:
    """The whole HTTP answer gunicorn sends for ``status``: JSON, and the connection closed."""
    code = CODES.get(status, ErrorCode.INTERNAL_ERROR)
    body = json.dumps({"error": str(code), "message": MESSAGES.get(status, "Internal error.")}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


def write_json_error(sock: socket.socket, status_int: int, reason: str, _mesg: str) -> None:
    """Drop-in for ``gunicorn.util.write_error`` (its ``mesg`` may echo the request: not sent back)."""
    from gunicorn import util

    util.write_nonblock(sock, json_error_page(status_int, reason))


def install(_server: Any = None, _worker: Any = None) -> None:
    """gunicorn's ``post_fork`` hook: this worker answers its own errors in JSON."""
    from gunicorn import util

    util.write_error = write_json_error
