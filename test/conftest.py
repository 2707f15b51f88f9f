"""Test fixtures on real parts: a throwaway Postgres database migrated with alembic, real Redis, real JWTs.

`./commands test` exports FRACTAL_TEST_PG_URL / FRACTAL_TEST_REDIS_URL for the servers it found or started;
without them the machine's defaults on 127.0.0.1 are used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from apiflask import APIBlueprint, APIFlask
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from alembic import command
from fractal.auth.dev_keys import DevKeyPair, generate_keypair, mint_token
from fractal.blueprints import BLUEPRINTS_BY_API
from fractal.config import Settings, normalise_database_url
from fractal.database import SessionFactory, create_db_engine
from fractal.factory import create_app
from fractal.migrations import alembic_config, run_alembic  # noqa: F401 (re-exported for tests)
from fractal.models import Base
from test.factories import Factories
from test.processes import three_shells  # noqa: F401 (a session fixture: one stack shared by its tests)
from test.servers import aws_env, moto_endpoint, smtp_server, starttls_smtp_server  # noqa: F401 (fixtures)
from test.throwaway import PG_SERVER_URL, create_database, database_name, drop_database

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER_URL = os.environ.get("FRACTAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TABLES = (
    "api_keys, leases, log_uploads, newsletter_subscriptions, idempotency_keys, events, heartbeats, mandelboxes,"
    " instances, images"
)

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh database for this run (parallel runs never collide), migrated once with alembic."""
    name = database_name("fractal_test")
    url = create_database(PG_SERVER_URL, name)
    run_alembic(url, command.upgrade, "head")
    yield url
    drop_database(PG_SERVER_URL, name)


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(normalise_database_url(database_url), pool_size=20, max_overflow=250)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def keypair() -> DevKeyPair:
    return generate_keypair()


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module to change settings for that module's apps."""
    return {}


@pytest.fixture
def settings(database_url: str, keypair: DevKeyPair, settings_overrides: dict[str, Any]) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "env": "test",
        "jwt_public_key": keypair.public_pem,
        "log_json": True,
        "assign_rate_limit": "100000 per minute",
    }
    values.update(settings_overrides)
    return Settings(**values)


@pytest.fixture
def connection(engine: Engine) -> Iterator[Any]:
    """One connection with an outer transaction, rolled back after the test."""
    with engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        transaction.rollback()


@pytest.fixture
def session_factory(connection: Any) -> SessionFactory:
    """Sessions whose commits become savepoints inside the test's outer transaction."""
    return sessionmaker(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)


@pytest.fixture
def db(session_factory: SessionFactory) -> Iterator[Session]:
    session = session_factory()
    yield session
    session.close()


@pytest.fixture(params=["postgres", "sqlite"])
def session_on_each_backend(request: pytest.FixtureRequest) -> Iterator[Session]:
    """A session on each backend, rolled back afterwards (Postgres: the test's outer transaction; SQLite: a
    database in memory, with the schema of the model)."""
    if request.param == "postgres":
        yield request.getfixturevalue("db")
        return
    settings: Settings = request.getfixturevalue("settings")
    engine = create_db_engine(Settings(**{**settings.model_dump(), "database_url": "sqlite:///:memory:"}))
    Base.metadata.create_all(engine)
    with Session(engine) as sqlite_session:
        yield sqlite_session
    engine.dispose()


@pytest.fixture
def committed_factory(engine: Engine) -> Iterator[SessionFactory]:
    """Sessions that commit for real (concurrency tests); every table is truncated afterwards."""
    yield sessionmaker(bind=engine, expire_on_commit=False)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))


@pytest.fixture
def bounded_settings(settings: Settings) -> Settings:
    """Short transaction bounds, so a test of them fails fast rather than hangs."""
    return Settings(
        **{
            **settings.model_dump(),
            "db_lock_timeout_ms": 300,
            "db_statement_timeout_ms": 500,
            "db_idle_in_transaction_timeout_ms": 5_000,
        }
    )


@pytest.fixture
def bounded_engine(bounded_settings: Settings, committed_factory: SessionFactory) -> Iterator[Engine]:
    """The engine the apps build for themselves (create_db_engine), on the run's database; rows committed for real
    are truncated afterwards (committed_factory)."""
    engine = create_db_engine(bounded_settings)
    yield engine
    engine.dispose()


@pytest.fixture
def factories(db: Session) -> Factories:
    return Factories(db)


@pytest.fixture
def make_token(keypair: DevKeyPair) -> Callable[..., str]:
    def _make(user_id: str = "user-1", *, admin: bool = False, **kwargs: Any) -> str:
        return mint_token(keypair.private_pem, user_id=user_id, admin=admin, **kwargs)

    return _make


@pytest.fixture
def user_headers(make_token: Callable[..., str]) -> Callable[..., dict[str, str]]:
    def _headers(user_id: str = "user-1", **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(user_id, **kwargs)}"}

    return _headers


@pytest.fixture
def admin_headers(make_token: Callable[..., str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token('operator', admin=True)}"}


def _build(blueprints: list[APIBlueprint], settings: Settings, factory: SessionFactory) -> APIFlask:
    return create_app(blueprints=blueprints, settings=settings, session_factory=factory)


@pytest.fixture
def make_app(settings: Settings, session_factory: SessionFactory) -> Callable[..., APIFlask]:
    """Build an app on the test's savepoint sessions (or another factory)."""

    def _make(kind: str, *, factory: SessionFactory | None = None, **overrides: Any) -> APIFlask:
        app_settings = Settings(**{**settings.model_dump(), **overrides}) if overrides else settings
        return _build(list(BLUEPRINTS_BY_API[kind]), app_settings, factory or session_factory)

    return _make


@pytest.fixture
def public_client(make_app: Callable[..., APIFlask]) -> Any:
    return make_app("public").test_client()


@pytest.fixture
def admin_client(make_app: Callable[..., APIFlask]) -> Any:
    return make_app("admin").test_client()


@pytest.fixture
def host_client(make_app: Callable[..., APIFlask]) -> Any:
    return make_app("host").test_client()
