"""FRACTAL_REQUIRE_SUBSCRIPTION: non-admin tokens need subscription_status active or trialing (402 otherwise)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from apiflask import APIFlask

from test.factories import Factories

Headers = Callable[..., dict[str, str]]
ASSIGN = {"regions": ["us-east-1"], "client_commit_hash": "abc123"}


@pytest.fixture
def gated(make_app: Callable[..., APIFlask], factories: Factories) -> Any:
    factories.image()
    factories.instance()
    return make_app("public", require_subscription=True).test_client()


@pytest.mark.parametrize("status", ["active", "trialing"])
def test_active_subscriptions_pass(gated: Any, user_headers: Headers, status: str) -> None:
    headers = user_headers("payer", extra_claims={"subscription_status": status})
    assert gated.get("/regions", headers=headers).status_code == 200
    assert gated.post("/mandelbox/assign", json=ASSIGN, headers=headers).status_code == 201


@pytest.mark.parametrize(
    "claims",
    [{"subscription_status": "canceled"}, {"subscription_status": "past_due"}, {}, {"subscription_status": ["active"]}],
)
def test_other_or_missing_subscriptions_are_402(gated: Any, user_headers: Headers, claims: dict[str, Any]) -> None:
    headers = user_headers("free-rider", extra_claims=claims)
    for response in (
        gated.get("/regions", headers=headers),
        gated.post("/mandelbox/assign", json=ASSIGN, headers=headers),
    ):
        assert response.status_code == 402
        assert response.json["error"] == "PAYMENT_REQUIRED" and response.json["message"]


def test_admins_are_exempt(gated: Any, user_headers: Headers) -> None:
    headers = user_headers("operator", admin=True)
    assert gated.post("/mandelbox/assign", json=ASSIGN, headers=headers).status_code == 201


def test_gate_off_by_default(public_client: Any, factories: Factories, user_headers: Headers) -> None:
    factories.image()
    factories.instance()
    assert public_client.post("/mandelbox/assign", json=ASSIGN, headers=user_headers("anyone")).status_code == 201


def test_bad_token_is_still_401_not_402(gated: Any) -> None:
    assert gated.get("/regions", headers={"Authorization": "Bearer nope"}).status_code == 401
