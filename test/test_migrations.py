"""Migrations are the only way the schema changes: upgrade from empty, no drift, one head, down and up."""

from __future__ import annotations

import uuid

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from alembic import command
from fractal.config import normalise_database_url
from fractal.models import INSTANCES_FILLFACTOR, Base
from test.conftest import PG_SERVER_URL, alembic_config, create_database, drop_database, run_alembic


def _fresh(tag: str) -> tuple[str, str]:
    name = f"fractal_mig_{tag}_{uuid.uuid4().hex[:8]}"
    return name, create_database(PG_SERVER_URL, name)


def test_single_head() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1


def test_upgrade_empty_database_then_no_drift_then_down_and_up() -> None:
    name, url = _fresh("cycle")
    try:
        run_alembic(url, command.upgrade, "head")
        engine = create_engine(normalise_database_url(url))
        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
            assert set(Base.metadata.tables) <= tables
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            # alembic does not compare storage parameters: check the one the model declares by hand.
            options = connection.execute(
                text("SELECT reloptions FROM pg_class WHERE relname = 'instances'")
            ).scalar_one()
            assert f"fillfactor={INSTANCES_FILLFACTOR}" in options
            names = set(connection.execute(text("SELECT proname FROM pg_proc WHERE proname LIKE 'fractal%'")).scalars())
            assert names == {"fractal_first_choice", "fractal_heartbeat"}
        run_alembic(url, command.check)  # alembic's own drift check raises on any difference
        run_alembic(url, command.downgrade, "base")
        with engine.connect() as connection:
            assert set(inspect(connection).get_table_names()) <= {"alembic_version"}
            # The functions the revisions create are dropped by their downgrades too.
            functions = connection.execute(text("SELECT proname FROM pg_proc WHERE proname LIKE 'fractal%'")).all()
            assert functions == []
        run_alembic(url, command.upgrade, "head")
        with engine.connect() as connection:
            assert set(Base.metadata.tables) <= set(inspect(connection).get_table_names())
        engine.dispose()
    finally:
        drop_database(PG_SERVER_URL, name)


def test_sqlite_upgrade_works(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/fractal.db"
    run_alembic(url, command.upgrade, "head")
    engine = create_engine(url)
    with engine.connect() as connection:
        assert set(Base.metadata.tables) <= set(inspect(connection).get_table_names())
    engine.dispose()
