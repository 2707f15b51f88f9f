"""Interactive API docs that work offline: the Swagger UI assets are served by the app itself.

APIFlask's `/docs` page loads Swagger UI from a CDN by default, so without internet it renders blank. The assets
come from the pinned `flask-swagger-ui` package (its `dist/` is the Swagger UI release it is versioned after; 5.x
renders OpenAPI 3.1, which `swagger-ui-bundle`'s 4.x cannot) and are answered from `/docs/assets/<file>`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from apiflask import APIFlask
from flask import Blueprint, Response, send_from_directory

from fractal.errors import NotFoundError

ASSETS_PACKAGE = "flask_swagger_ui"
# Only what the docs page loads; nothing else in the package directory is reachable.
ASSET_FILES = frozenset(
    {"swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "favicon-32x32.png"}
)
ASSET_MAX_AGE_S = 3600

# A plain Flask blueprint: APIFlask leaves it out of the OpenAPI spec (static files are not part of the API).
ASSETS_PATH = "/docs/assets"
docs_assets_blueprint = Blueprint("docs_assets", __name__, url_prefix=ASSETS_PATH)


def assets_dir() -> Path:
    """The directory holding the Swagger UI release inside the installed package."""
    return Path(str(resources.files(ASSETS_PACKAGE) / "dist"))


@docs_assets_blueprint.get("/<filename>")
def docs_asset(filename: str) -> Response:
    if filename not in ASSET_FILES:
        raise NotFoundError()
    return send_from_directory(assets_dir(), filename, max_age=ASSET_MAX_AGE_S)


def configure_docs(app: APIFlask) -> None:
    """Point APIFlask's Swagger UI page at the assets served here, and register the route that serves them."""
    app.register_blueprint(docs_assets_blueprint)
    # Same-origin absolute paths: the page is /docs, so a relative "assets/..." would resolve to /assets/...
    asset = {name: f"{ASSETS_PATH}/{name}" for name in ASSET_FILES}
    app.config.update(
        SWAGGER_UI_CSS=asset["swagger-ui.css"],
        SWAGGER_UI_BUNDLE_JS=asset["swagger-ui-bundle.js"],
        SWAGGER_UI_STANDALONE_PRESET_JS=asset["swagger-ui-standalone-preset.js"],
        DOCS_FAVICON=asset["favicon-32x32.png"],
        # Swagger UI would otherwise ask validator.swagger.io about the spec: no outbound call from the docs.
        SWAGGER_UI_CONFIG={"validatorUrl": None},
    )
