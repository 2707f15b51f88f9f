"""Running the alembic migrations from code: the dev server, the container start sequence, benchmarks, tests.

The migration scripts are not part of the installed package: `alembic.ini` and `alembic/` live at the project's
root (in a checkout, and in the container's /app beside env.py). Which `alembic.ini` is used, first match wins:

1. the path a caller passes (env.py passes the one beside itself);
2. ``FRACTAL_ALEMBIC_INI`` (the Dockerfile sets it to /app/alembic.ini, for anything else run in the image);
3. the checkout this package was imported from (an editable install);
4. ``./alembic.ini`` in the working directory.

Nothing found is a :class:`MigrationsNotFoundError` saying where it looked, never alembic's own traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic.config import Config
from sqlalchemy import Connection, create_engine

from alembic import command
from fractal.config import normalise_database_url
from fractal.database import ensure_sqlite_directory

ALEMBIC_INI_ENV = "FRACTAL_ALEMBIC_INI"
# An editable install imports the package from the checkout, where alembic.ini sits beside fractal/. Installed
# from a wheel this is site-packages, which holds no alembic.ini: the other candidates apply.
_CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


class MigrationsNotFoundError(RuntimeError):
    """No alembic.ini with its script directory was found; the message says where it looked."""


def _usable(ini: Path) -> bool:
    # script_location is %(here)s/alembic: the scripts must sit beside the ini, with their env.py.
    return ini.is_file() and (ini.parent / "alembic" / "env.py").is_file()


def find_alembic_ini(explicit: Path | str | None = None) -> Path:
    """The alembic.ini to migrate with (see the module docstring for the order).

    Raises:
        MigrationsNotFoundError: an explicit or ``FRACTAL_ALEMBIC_INI`` path is unusable, or nothing was found.
    """
    if explicit is not None:
        path = Path(explicit)
        if not _usable(path):
            raise MigrationsNotFoundError(f"no alembic.ini with an alembic/ directory beside it at {path}")
        return path
    from_env = os.environ.get(ALEMBIC_INI_ENV, "").strip()
    if from_env:
        path = Path(from_env)
        if not _usable(path):
            raise MigrationsNotFoundError(
                f"{ALEMBIC_INI_ENV}={from_env}: no alembic.ini with an alembic/ directory beside it there"
            )
        return path
    candidates = [_CHECKOUT_ROOT / "alembic.ini", Path.cwd() / "alembic.ini"]
    for candidate in candidates:
        if _usable(candidate):
            return candidate
    looked = ", ".join(str(candidate) for candidate in candidates)
    raise MigrationsNotFoundError(
        f"migrations not found (looked for alembic.ini and alembic/ at {looked}); "
        f"set {ALEMBIC_INI_ENV} to the project's alembic.ini"
    )


def alembic_config(connection: Connection | None = None, *, alembic_ini: Path | str | None = None) -> Config:
    """alembic.ini's configuration, logging left to us, optionally bound to an open connection."""
    ini = find_alembic_ini(alembic_ini)
    config = Config(str(ini))
    config.set_main_option("script_location", str(ini.parent / "alembic"))
    config.attributes["skip_logging_config"] = True
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def run_alembic(
    database_url: str, operation: Callable[..., Any], *args: Any, alembic_ini: Path | str | None = None
) -> None:
    """Run an alembic command (``command.upgrade``, ``command.check``, ...) against ``database_url``.

    alembic/env.py holds a Postgres advisory lock around the run, so concurrent callers migrate once.
    """
    config = alembic_config(alembic_ini=alembic_ini)  # before connecting: a missing script dir fails fast
    ensure_sqlite_directory(database_url)
    engine = create_engine(normalise_database_url(database_url))
    try:
        with engine.connect() as connection:
            config.attributes["connection"] = connection
            operation(config, *args)
            connection.commit()
    finally:
        engine.dispose()


def upgrade_to_head(database_url: str, *, alembic_ini: Path | str | None = None) -> None:
    """`alembic upgrade head` against ``database_url``."""
    run_alembic(database_url, command.upgrade, "head", alembic_ini=alembic_ini)
