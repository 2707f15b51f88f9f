"""Running the alembic migrations from code: the dev server, the container start sequence, benchmarks, tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic.config import Config
from sqlalchemy import Connection, create_engine

from alembic import command
from fractal.config import normalise_database_url
from fractal.database import ensure_sqlite_directory

# Flat layout: alembic.ini and alembic/ sit beside the package, in the repository (and in the container's /app).
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def alembic_config(connection: Connection | None = None) -> Config:
    """alembic.ini's configuration, logging left to us, optionally bound to an open connection."""
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    config.attributes["skip_logging_config"] = True
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def run_alembic(database_url: str, operation: Callable[..., Any], *args: Any) -> None:
    """Run an alembic command (``command.upgrade``, ``command.check``, ...) against ``database_url``.

    alembic/env.py holds a Postgres advisory lock around the run, so concurrent callers migrate once.
    """
    ensure_sqlite_directory(database_url)
    engine = create_engine(normalise_database_url(database_url))
    try:
        with engine.connect() as connection:
            operation(alembic_config(connection), *args)
            connection.commit()
    finally:
        engine.dispose()


def upgrade_to_head(database_url: str) -> None:
    """`alembic upgrade head` against ``database_url``."""
    run_alembic(database_url, command.upgrade, "head")
