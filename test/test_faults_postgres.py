"""Postgres restarted while requests flow: 503 DATABASE_UNAVAILABLE during the outage, recovery without restart."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select, text

from alembic import command
from fractal.blueprints import PUBLIC_BLUEPRINTS
from fractal.config import Settings
from fractal.database import create_db_engine, create_session_factory
from fractal.factory import create_app
from fractal.models import Instance, Mandelbox
from test.conftest import create_database, run_alembic
from test.servers import throwaway_postgres

pytestmark = pytest.mark.slow


def test_database_outage_is_503_and_recovers(settings: Settings, user_headers: Callable[..., dict[str, str]]) -> None:
    with throwaway_postgres() as server:
        url = create_database(server.url, "fractal")
        run_alembic(url, command.upgrade, "head")
        app_settings = Settings(**{**settings.model_dump(), "database_url": url, "max_mandelboxes_per_user": 1000})
        engine = create_db_engine(app_settings)
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO images (region, client_commit_hash, ami_id, active, instance_type, mandelbox_capacity)"
                    " VALUES ('us-east-1', 'abc123', 'ami-1', true, 't', 100)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO instances (instance_name, region, client_commit_hash, ami_id, instance_type, ip,"
                    " mandelbox_capacity, status, host_secret_hash)"
                    " VALUES ('h1', 'us-east-1', 'abc123', 'ami-1', 't', '10.0.0.1', 100, 'ACTIVE', 'x')"
                )
            )
        app = create_app(
            blueprints=PUBLIC_BLUEPRINTS, settings=app_settings, session_factory=create_session_factory(engine)
        )
        client = app.test_client()
        headers = user_headers("survivor")

        def assign() -> Any:
            return client.post(
                "/mandelbox/assign", json={"regions": ["us-east-1"], "client_commit_hash": "abc123"}, headers=headers
            )

        assert assign().status_code == 201

        server.stop("immediate")  # a crash, not a polite shutdown: in-flight connections die
        during = [assign() for _ in range(3)]
        assert [response.status_code for response in during] == [503, 503, 503]
        assert {response.json["error"] for response in during} == {"DATABASE_UNAVAILABLE"}
        assert all(int(response.headers["Retry-After"]) > 0 for response in during)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json["checks"]["database"] == "unavailable"

        server.start()
        started = time.monotonic()
        while True:
            response = assign()
            if response.status_code == 201:
                break
            assert response.status_code == 503, response.json
            assert time.monotonic() - started < 5, "the service did not recover within 5 s"
            time.sleep(0.1)
        assert client.get("/readyz").status_code == 200

        # Nothing half-written: every mandelbox row is counted on its instance.
        with create_session_factory(engine)() as session:
            boxes = session.execute(select(func.count()).select_from(Mandelbox)).scalar_one()
            live = session.execute(select(Instance.live_mandelboxes)).scalar_one()
            assert boxes == live == 2
        engine.dispose()
