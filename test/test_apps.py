"""Each shell serves its own routes only; every app answers health, docs and errors in the one JSON shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

ROUTES = {
    "public": [("get", "/regions"), ("post", "/mandelbox/assign")],
    "admin": [("get", "/admin/images"), ("get", "/admin/instances"), ("get", "/admin/mandelboxes")],
}


@pytest.mark.parametrize("kind", ["public", "admin", "host"])
def test_every_app_serves_health_spec_and_docs(kind: str, make_app: Callable[..., Any]) -> None:
    client = make_app(kind).test_client()
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["checks"]["database"] == "ok"
    spec = client.get("/openapi.json")
    assert spec.status_code == 200 and spec.json["openapi"].startswith("3.")
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("kind", ["public", "admin", "host"])
def test_unknown_paths_are_json_404(kind: str, make_app: Callable[..., Any]) -> None:
    response = make_app(kind).test_client().get("/definitely/not/here")
    assert response.status_code == 404
    assert response.json == {"error": "NOT_FOUND", "message": "Not found."}


def test_routes_of_one_api_do_not_exist_in_the_others(
    make_app: Callable[..., Any], admin_headers: dict[str, str]
) -> None:
    for owner, routes in ROUTES.items():
        for other in {"public", "admin", "host"} - {owner}:
            client = make_app(other).test_client()
            for method, path in routes:
                response = getattr(client, method)(path, headers=admin_headers, json={})
                assert response.status_code == 404, (other, method, path)
                assert response.json["error"] == "NOT_FOUND"


def test_wrong_method_is_json_405(public_client: Any) -> None:
    response = public_client.put("/regions")
    assert response.status_code == 405
    assert response.json["error"] == "METHOD_NOT_ALLOWED"


def test_oversized_body_is_json_413(public_client: Any, user_headers: Callable[..., dict[str, str]]) -> None:
    response = public_client.post(
        "/mandelbox/assign",
        data=b"x" * (2 * 1024 * 1024),
        headers={**user_headers(), "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json["error"] == "PAYLOAD_TOO_LARGE"


def test_unexpected_exception_is_500_without_internals(
    make_app: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    app = make_app("public")

    @app.get("/boom")
    def boom() -> Any:
        raise RuntimeError("secret internal detail")

    response = app.test_client().get("/boom", headers={"X-Request-ID": "req-12345678"})
    assert response.status_code == 500
    assert response.json == {"error": "INTERNAL_ERROR", "message": "Internal error."}
    assert "secret internal detail" not in response.get_data(as_text=True)
    logged = capsys.readouterr().err
    assert "req-12345678" in logged and "unhandled_exception" in logged


def test_request_id_is_echoed(public_client: Any) -> None:
    response = public_client.get("/healthz", headers={"X-Request-ID": "abcdef123456"})
    assert response.headers["X-Request-ID"] == "abcdef123456"
