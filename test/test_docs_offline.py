"""`/docs` renders without internet: every asset the page loads is same-origin and served by the app itself."""

from __future__ import annotations

import importlib
import re
from typing import Any

import pytest

from fractal.blueprints import API_TITLES
from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.devserver import build_apps

SHELLS = {"app": "public", "admin_app": "admin", "host_service_app": "host"}
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


def assert_docs_are_self_contained(client: Any) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    references = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert len(references) >= 4, html  # stylesheet, favicon, the bundle and its preset
    assert "SwaggerUIBundle(" in html
    for reference in references:
        # Same origin: an absolute path, never a scheme or a protocol-relative //host.
        assert reference.startswith("/") and not reference.startswith("//"), reference
        asset = client.get(reference)
        assert asset.status_code == 200, reference
        suffix = reference[reference.rfind(".") :]
        assert asset.content_type.startswith(CONTENT_TYPES[suffix]), (reference, asset.content_type)
        assert len(asset.data) > 500, reference
    bundle = client.get(next(ref for ref in references if ref.endswith("swagger-ui-bundle.js"))).get_data(as_text=True)
    assert "isOAS31" in bundle  # a Swagger UI that renders the OpenAPI 3.1 specs these apps serve
    assert "cdn." not in html and '"validatorUrl": null' in html  # no outbound call from the page either


@pytest.mark.parametrize("module", sorted(SHELLS))
def test_each_shell_titles_its_spec_and_serves_its_docs_offline(module: str) -> None:
    client = importlib.import_module(module).app.test_client()
    spec = client.get("/openapi.json").get_json()
    assert spec["info"]["title"] == API_TITLES[SHELLS[module]]
    assert not any(path.startswith("/docs") for path in spec["paths"])  # static assets are not API operations
    assert_docs_are_self_contained(client)


def test_devserver_apps_have_their_own_titles(settings: Settings, session_factory: SessionFactory) -> None:
    apps = build_apps(settings, session_factory)
    titles = {name: app.test_client().get("/openapi.json").get_json()["info"]["title"] for name, app in apps.items()}
    assert titles == API_TITLES
    assert len(set(titles.values())) == 3


def test_only_the_docs_assets_are_reachable(admin_client: Any) -> None:
    for path in ("/docs/assets/VERSION", "/docs/assets/LICENSE", "/docs/assets/..%2Fflask_swagger_ui.py"):
        response = admin_client.get(path)
        assert response.status_code == 404 and response.get_json()["error"] == "NOT_FOUND", path
