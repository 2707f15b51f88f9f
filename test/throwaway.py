"""Throwaway resources shared by test/ and bench/: a free loopback port and a database made for one run.

Light on purpose (no pytest, no servers): the benchmark scripts import it too.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fractal.config import normalise_database_url
from fractal.migrations import upgrade_to_head

# `./commands test` and `./commands bench` export the server they found or started.
PG_SERVER_URL = os.environ.get("FRACTAL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _admin(server_url: str, sql: str) -> None:
    engine = create_engine(normalise_database_url(server_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(sql))
    finally:
        engine.dispose()


def create_database(server_url: str, name: str) -> str:
    """CREATE DATABASE ``name`` on the server (dropping a leftover of that name); returns its URL."""
    _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _admin(server_url, f'CREATE DATABASE "{name}"')
    return make_url(normalise_database_url(server_url)).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_name(prefix: str) -> str:
    """A name no concurrent run uses."""
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


@contextmanager
def throwaway_database(prefix: str, *, server_url: str = PG_SERVER_URL, migrate: bool = True) -> Iterator[str]:
    """A fresh database (migrated to head unless ``migrate`` is False), dropped afterwards. Yields its URL."""
    name = database_name(prefix)
    url = create_database(server_url, name)
    try:
        if migrate:
            upgrade_to_head(url)
        yield url
    finally:
        drop_database(server_url, name)
