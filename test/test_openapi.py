"""OpenAPI: every app's spec is valid OpenAPI, documents the error shape, and the docs UI is served."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from apiflask import APIFlask
from openapi_spec_validator import validate

KINDS = ["public", "admin", "host"]


@pytest.fixture(params=KINDS)
def spec_and_client(request: pytest.FixtureRequest, make_app: Callable[..., APIFlask]) -> tuple[dict[str, Any], Any]:
    client = make_app(request.param).test_client()
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json, client


def test_spec_is_valid_openapi(spec_and_client: tuple[dict[str, Any], Any]) -> None:
    spec, _ = spec_and_client
    validate(spec)
    assert spec["openapi"].startswith("3.")
    assert {"/healthz", "/readyz"} <= set(spec["paths"])
    assert "/metrics" not in spec["paths"]  # Prometheus text, not part of the JSON API


def test_every_error_response_uses_the_error_schema(spec_and_client: tuple[dict[str, Any], Any]) -> None:
    spec, _ = spec_and_client
    error = spec["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"error", "message"}
    checked = 0
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            for status, response in operation["responses"].items():
                if str(status)[0] in "45":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
                    checked += 1
    assert checked > 0


def test_docs_ui_is_served(spec_and_client: tuple[dict[str, Any], Any]) -> None:
    _, client = spec_and_client
    response = client.get("/docs")
    assert response.status_code == 200
    assert "text/html" in response.content_type
    assert "openapi.json" in response.get_data(as_text=True)


def test_public_spec_documents_assign_refusals(make_app: Callable[..., APIFlask]) -> None:
    spec = make_app("public").test_client().get("/openapi.json").json
    responses = spec["paths"]["/mandelbox/assign"]["post"]["responses"]
    assert {"201", "400", "401", "409", "422", "503"} <= set(responses)
    assert spec["paths"]["/mandelbox/assign"]["post"]["requestBody"]["required"] is True


@pytest.mark.parametrize("kind", ["public", "admin", "host"])
def test_the_spec_server_never_comes_from_a_request_host(make_app: Callable[..., Any], kind: str) -> None:
    client = make_app(kind).test_client()
    poisoned = client.get("/openapi.json", headers={"Host": "attacker.example"})
    honest = client.get("/openapi.json", headers={"Host": "api.fractal.example"})
    for answer in (poisoned, honest):
        assert answer.status_code == 200
        assert answer.json["servers"] == [{"url": "/", "description": "this API, where this document was served from"}]
        assert "attacker.example" not in answer.get_data(as_text=True)
