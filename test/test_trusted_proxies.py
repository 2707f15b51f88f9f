"""FRACTAL_TRUSTED_PROXIES: how the client's address and scheme are read behind reverse proxies."""

from __future__ import annotations

from typing import Any

import pytest
from apiflask import APIBlueprint
from flask import request

from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.factory import create_app

probe = APIBlueprint("proxy_probe", __name__)


@probe.get("/probe/client")
def client_seen() -> Any:
    return {"addr": request.remote_addr, "scheme": request.scheme}


def seen(settings: Settings, session_factory: SessionFactory, proxies: int, headers: dict[str, str]) -> Any:
    app = create_app(
        blueprints=[probe],
        settings=Settings(**{**settings.model_dump(), "trusted_proxies": proxies}),
        session_factory=session_factory,
    )
    return app.test_client().get("/probe/client", headers=headers, environ_base={"REMOTE_ADDR": "10.9.9.9"}).json


def test_without_proxies_forwarded_headers_are_ignored(settings: Settings, session_factory: SessionFactory) -> None:
    answer = seen(settings, session_factory, 0, {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"})
    assert answer == {"addr": "10.9.9.9", "scheme": "http"}


@pytest.mark.parametrize(
    ("forwarded_for", "proxies", "client"),
    [
        ("203.0.113.7", 1, "203.0.113.7"),  # the proxy's view of its client
        ("198.51.100.1, 203.0.113.7", 1, "203.0.113.7"),  # a spoofed first hop is not believed
        ("198.51.100.1, 203.0.113.7", 2, "198.51.100.1"),  # two trusted proxies: two hops back
    ],
)
def test_the_trusted_hops_decide_the_client(
    settings: Settings, session_factory: SessionFactory, forwarded_for: str, proxies: int, client: str
) -> None:
    headers = {"X-Forwarded-For": forwarded_for, "X-Forwarded-Proto": "https" if proxies == 1 else "https, https"}
    assert seen(settings, session_factory, proxies, headers) == {"addr": client, "scheme": "https"}
