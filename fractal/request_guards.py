"""Guards every app installs on itself (``create_app`` calls ``install_request_guards`` and hands
``refuse_unservable_path`` to the request pipeline's before hook): request JSON that cannot reach a 500, no routing
redirects, no path part holding a NUL, and a 413 that closes the connection."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Request
from flask.sansio.app import App
from werkzeug.routing import RequestRedirect

from fractal.errors import NotFoundError
from fractal.json_limits import install_json_limits
from fractal.observability import REQUEST_ID_HEADER, REQUEST_ID_KEY

_INSTALLED = "fractal_request_guards"


def install_request_guards(app: App) -> None:
    """JSON limits on request bodies, and a 413 that closes the connection (the same WSGI wrapper also sends the
    request id header, see ``CloseAfterPayloadTooLarge``). The path guards run in the request pipeline's one before
    hook (``refuse_unservable_path``), not in a hook of their own: each hook Flask dispatches costs a call and a
    request lookup on every request."""
    if app.extensions.get(_INSTALLED):
        return
    app.extensions[_INSTALLED] = True
    install_json_limits(app)
    if isinstance(app, Flask):
        app.wsgi_app = CloseAfterPayloadTooLarge(app.wsgi_app)  # type: ignore[method-assign]


def refuse_unservable_path(current: Request) -> None:
    """404 (in the JSON shape) for a path that names nothing an API serves.

    werkzeug answers a non-canonical path (``//``, which a decoded ``%2f`` produces) with a 308 HTML page that
    bypasses every error handler: an API path is canonical or names nothing, so 404, never a redirect. A path part
    holding a NUL character names nothing either (and PostgreSQL text cannot hold one).
    """
    if isinstance(current.routing_exception, RequestRedirect):
        raise NotFoundError()
    values = current.view_args
    if values:
        for value in values.values():
            if isinstance(value, str) and "\x00" in value:
                raise NotFoundError()


class CloseAfterPayloadTooLarge:
    """WSGI middleware: a 413 answer ends the connection; and every answer to a request the pipeline gave an id
    carries it in ``X-Request-ID``.

    A 413 is sent before the body was read (or while most of it is unread). To keep the connection alive the
    server must first read and discard the rest: gunicorn 27 tries for up to 5 s, holding a worker thread per such
    request (a cheap way to tie up every thread), and a client that stopped sending after ``Expect: 100-continue``
    sees its next request taken for body bytes. WSGI has no portable way to say "close": under gunicorn the
    ``start_response`` callable is a method of gunicorn's response, whose ``force_close`` does exactly that; under
    other servers this is a no-op.

    The request id header is appended here, to the header list the server gets, rather than set on the Flask
    response in the pipeline's after hook: this wrapper's ``start_response`` runs on every request anyway, and
    werkzeug's ``Headers.__setitem__`` (a scan for an existing header and two newline checks) was a tenth of what
    ``/healthz`` paid beyond a bare Flask hello. The id is safe to send as is: it is either an incoming id that
    matched ``[A-Za-z0-9._-]{8,64}`` or 32 hex digits (``observability._start_request``). No Fractal view sets
    ``X-Request-ID`` itself, so the answer carries it once.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            request_id = environ.get(REQUEST_ID_KEY)
            if request_id:
                headers.append((REQUEST_ID_HEADER, request_id))
            if status.startswith("413"):
                force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
                if callable(force_close):
                    force_close()
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        return self.app(environ, _start_response)
