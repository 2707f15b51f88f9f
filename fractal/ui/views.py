"""The operators' fleet page: ``/ui/`` and its few assets, served by the admin app from package data.

The page is static: its script reads the admin API (``/admin/capacity``, ``/admin/instances``, ``/admin/events``)
with the credential the operator pastes (an admin JWT or an API key, kept in the tab's sessionStorage only) and
calls ``POST /admin/instances/<name>/drain``. Nothing is loaded from elsewhere and nothing runs inline, so the
page is served under a strict Content-Security-Policy. Not part of the API: the blueprint stays out of the spec.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from apiflask import APIBlueprint
from flask import Response, send_from_directory

from fractal.errors import NotFoundError

UI_PATH = "/ui"
PAGE = "index.html"
# Only these files are reachable; a name outside the set is a 404 (no directory listing, no traversal).
ASSET_FILES = frozenset({"fleet.css", "fleet.js", "favicon.svg"})
ASSET_MAX_AGE_S = 300

# Everything from this origin only, nothing inline, no framing, no forms posting elsewhere, no <base> rewriting.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}

ui_blueprint = APIBlueprint("ui", __name__, url_prefix=UI_PATH, enable_openapi=False)


def static_dir() -> Path:
    """Where the page and its assets lie inside the installed package."""
    return Path(str(resources.files("fractal.ui") / "static"))


def _secured(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


@ui_blueprint.get("/")
def fleet_page() -> Response:
    response = send_from_directory(static_dir(), PAGE, max_age=0)
    response.headers["Cache-Control"] = "no-store"
    return _secured(response)


@ui_blueprint.get("/<filename>")
def fleet_asset(filename: str) -> Response:
    if filename not in ASSET_FILES:
        raise NotFoundError()
    return _secured(send_from_directory(static_dir(), filename, max_age=ASSET_MAX_AGE_S))
