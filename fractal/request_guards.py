"""Guards every app installs on itself (through the health blueprint, which every app serves): request JSON that
cannot reach a 500, and no routing redirects.

TODO(lead): call :func:`install_request_guards` from ``factory.create_app`` and drop the health blueprint's hook.
"""

from __future__ import annotations

from flask import request
from flask.sansio.app import App
from werkzeug.routing import RequestRedirect

from fractal.errors import NotFoundError
from fractal.json_limits import install_json_limits

_INSTALLED = "fractal_request_guards"


def install_request_guards(app: App) -> None:
    """JSON limits on request bodies, and a 404 in the JSON shape where werkzeug would redirect."""
    if app.extensions.get(_INSTALLED):
        return
    app.extensions[_INSTALLED] = True
    install_json_limits(app)

    @app.before_request
    def _refuse_redirects() -> None:
        # werkzeug answers a non-canonical path (``//``, which a decoded ``%2f`` produces) with a 308 HTML page
        # that bypasses every error handler. An API path is canonical or names nothing: 404, never a redirect.
        if isinstance(request.routing_exception, RequestRedirect):
            raise NotFoundError()
