"""The yardstick: a naive app doing the essential work of assign and heartbeat, and a bare Flask hello.

    gunicorn -c gunicorn.conf.py bench.reference_app:app      (bench/yardsticks.py starts it)

What a straightforward implementation would write, with none of the project's features: RS256 verified with pyjwt on
every request (no verified-token cache, the key parsed once), psycopg2 straight from a small per-process pool, no
Redis (no rate limit, no cache), no audit event, no idempotency, no metrics, no access log, Flask's own JSON. It
works on tables of its own (``ref_*``, created by ``create_schema``) in the bench database, so the two apps never
share rows or locks. Served by the same gunicorn with the same gunicorn.conf.py as the project's apps.

- ``GET /hello``: the bare framework (no I/O).
- ``POST /assign``: one transaction of 5 statements (psycopg2's BEGIN, the user's live count, the pick with
  ``FOR UPDATE SKIP LOCKED``, the slot update, the mandelbox insert) and COMMIT; 409 at the per-user limit, 503
  when no instance has room.
- ``POST /assign-floor``: the same work as ``/assign`` (pyjwt RS256, the same checks and answers) done as cheaply
  as Flask + pyjwt + psycopg2 allow: ONE round trip, a single statement (count, pick ``FOR UPDATE SKIP LOCKED`` in
  region order, slot update, insert) on an autocommit connection, so no BEGIN or COMMIT of its own. The yardstick of
  what this stack can reach at all; like ``/assign`` it keeps no per-user lock (its live count may race).
- ``POST /heartbeat``: the host's secret looked up by its SHA-256 (an instance that is not TERMINATED), one
  upsert of its heartbeats row, the answer.
- ``POST /heartbeat-floor``: the same work and answers as ``/heartbeat`` in ONE round trip: the lookup and the
  upsert as a single statement on an autocommit connection. What a heartbeat can cost at all on this stack.
- ``GET /readyz``: for the harness's wait.

Settings from the environment the bench gives every server: DATABASE_URL, FRACTAL_JWT_PUBLIC_KEY,
FRACTAL_MAX_MANDELBOXES_PER_USER.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jwt
import psycopg2
import psycopg2.pool
from cryptography.hazmat.primitives import serialization
from flask import Flask, request

SCHEMA_SQL = """
CREATE TABLE ref_instances (
    instance_name text PRIMARY KEY,
    region text NOT NULL,
    client_commit_hash text NOT NULL,
    ip text,
    status text NOT NULL,
    mandelbox_capacity integer NOT NULL,
    live_mandelboxes integer NOT NULL DEFAULT 0 CHECK (live_mandelboxes <= mandelbox_capacity),
    host_secret_hash text NOT NULL UNIQUE
) WITH (fillfactor = 70);
CREATE INDEX ref_instances_pick ON ref_instances (region, client_commit_hash) WHERE status = 'ACTIVE';
CREATE TABLE ref_mandelboxes (
    mandelbox_id uuid PRIMARY KEY,
    instance_name text NOT NULL REFERENCES ref_instances (instance_name),
    user_id text NOT NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ref_mandelboxes_live_user ON ref_mandelboxes (user_id) WHERE status <> 'EXITED';
CREATE TABLE ref_heartbeats (
    instance_name text PRIMARY KEY REFERENCES ref_instances (instance_name),
    last_heartbeat_at timestamptz NOT NULL,
    metrics jsonb NOT NULL
);
"""

# Copies the project's seeded instances (same names, regions, capacities and secret digests), so both apps see the
# same fleet.
COPY_INSTANCES_SQL = """
INSERT INTO ref_instances (instance_name, region, client_commit_hash, ip, status, mandelbox_capacity,
                           live_mandelboxes, host_secret_hash)
SELECT instance_name, region, client_commit_hash, ip, status::text, mandelbox_capacity, 0, host_secret_hash
FROM instances
"""

HEARTBEAT_INTERVAL_S = 10.0
POOL_SIZE = int(os.environ.get("GUNICORN_THREADS", "4"))

app = Flask(__name__)

_pool_lock = threading.Lock()
_pool: psycopg2.pool.ThreadedConnectionPool | None = None
_autocommit_pool: psycopg2.pool.ThreadedConnectionPool | None = None
_public_key: Any = None


def _libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


def _connections() -> psycopg2.pool.ThreadedConnectionPool:
    """One pool per worker process, made on first use (after gunicorn forked)."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                # psycopg2's pool closes a returned connection once minconn are idle: minconn covers every
                # thread (gthread x 4), so connections are reused, never opened per request.
                _pool = psycopg2.pool.ThreadedConnectionPool(
                    POOL_SIZE, POOL_SIZE + 4, _libpq_url(os.environ["DATABASE_URL"])
                )
    return _pool


def _autocommit_connections() -> psycopg2.pool.ThreadedConnectionPool:
    """The floor's pool: its connections run every statement as a transaction of its own (no BEGIN, no COMMIT)."""
    global _autocommit_pool
    if _autocommit_pool is None:
        with _pool_lock:
            if _autocommit_pool is None:
                _autocommit_pool = psycopg2.pool.ThreadedConnectionPool(
                    POOL_SIZE, POOL_SIZE + 4, _libpq_url(os.environ["DATABASE_URL"])
                )
    return _autocommit_pool


@contextmanager
def _connection(*, autocommit: bool = False) -> Iterator[Any]:
    pool = _autocommit_connections() if autocommit else _connections()
    connection = pool.getconn()
    if autocommit and not connection.autocommit:
        connection.autocommit = True
    try:
        yield connection
    except BaseException:
        connection.rollback()
        raise
    finally:
        pool.putconn(connection)


def _key() -> Any:
    global _public_key
    if _public_key is None:
        _public_key = serialization.load_pem_public_key(os.environ["FRACTAL_JWT_PUBLIC_KEY"].encode())
    return _public_key


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:] if header.startswith("Bearer ") else None


def _answer(body: dict[str, Any], status: int) -> tuple[dict[str, Any], int]:
    return body, status


@app.get("/hello")
def hello() -> tuple[dict[str, Any], int]:
    return _answer({"hello": "world"}, 200)


@app.get("/readyz")
def readyz() -> tuple[dict[str, Any], int]:
    with _connection() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        connection.rollback()
    return _answer({"status": "ok"}, 200)


@dataclass(frozen=True)
class _AssignRequest:
    """A verified assign request: whose, and what it asks for."""

    user_id: str
    regions: list[str]
    commit: str
    max_per_user: int


def _assign_request() -> _AssignRequest | tuple[dict[str, Any], int]:
    """/assign's and /assign-floor's shared front: the RS256 token verified, the body checked; else the answer."""
    token = _bearer()
    if token is None:
        return _answer({"error": "UNAUTHORIZED"}, 401)
    try:
        claims = jwt.decode(token, _key(), algorithms=["RS256"], options={"require": ["exp", "sub"]})
    except jwt.InvalidTokenError:
        return _answer({"error": "UNAUTHORIZED"}, 401)
    body = request.get_json(silent=True)
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("regions"), list)
        or not all(isinstance(r, str) for r in body["regions"])
        or not isinstance(body.get("client_commit_hash"), str)
    ):
        return _answer({"error": "VALIDATION_ERROR"}, 400)
    max_per_user = int(os.environ.get("FRACTAL_MAX_MANDELBOXES_PER_USER", "1"))
    return _AssignRequest(str(claims["sub"]), body["regions"], body["client_commit_hash"], max_per_user)


@app.post("/assign")
def assign() -> tuple[dict[str, Any], int]:
    wanted = _assign_request()
    if not isinstance(wanted, _AssignRequest):
        return wanted
    user_id, max_per_user = wanted.user_id, wanted.max_per_user
    mandelbox_id = uuid.uuid4()
    with _connection() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM ref_mandelboxes WHERE user_id = %s AND status <> 'EXITED'", (user_id,))
        if cursor.fetchone()[0] >= max_per_user:
            connection.rollback()
            return _answer({"error": "USER_ALREADY_ACTIVE"}, 409)
        for region in wanted.regions:
            cursor.execute(
                """
                SELECT instance_name, ip, region FROM ref_instances
                WHERE region = %s AND client_commit_hash = %s AND status = 'ACTIVE'
                  AND live_mandelboxes < mandelbox_capacity
                ORDER BY live_mandelboxes DESC, instance_name
                LIMIT 1 FOR UPDATE SKIP LOCKED
                """,
                (region, wanted.commit),
            )
            picked = cursor.fetchone()
            if picked is None:
                continue
            name, ip, picked_region = picked
            cursor.execute(
                "UPDATE ref_instances SET live_mandelboxes = live_mandelboxes + 1 WHERE instance_name = %s", (name,)
            )
            cursor.execute(
                "INSERT INTO ref_mandelboxes (mandelbox_id, instance_name, user_id, status) "
                "VALUES (%s, %s, %s, 'ALLOCATED')",
                (str(mandelbox_id), name, user_id),
            )
            connection.commit()
            return _answer(
                {
                    "mandelbox_id": str(mandelbox_id),
                    "ip": ip,
                    "region": picked_region,
                    "instance_name": name,
                    "status": "ALLOCATED",
                },
                201,
            )
        connection.rollback()
    return _answer({"error": "NO_INSTANCE_AVAILABLE"}, 503)


# /assign's five statements as one: the live count, the pick in the requested regions' order, the slot, the insert.
# The answer is always one row: the live count, and the instance when a slot was taken (else NULLs).
FLOOR_SQL = """
WITH live AS (
    SELECT count(*) AS n FROM ref_mandelboxes WHERE user_id = %(user_id)s AND status <> 'EXITED'
), picked AS (
    SELECT instance_name FROM ref_instances
    WHERE region = ANY(%(regions)s) AND client_commit_hash = %(commit)s AND status = 'ACTIVE'
      AND live_mandelboxes < mandelbox_capacity AND (SELECT n FROM live) < %(max_per_user)s
    ORDER BY array_position(%(regions)s, region), live_mandelboxes DESC, instance_name
    LIMIT 1 FOR UPDATE SKIP LOCKED
), taken AS (
    UPDATE ref_instances i SET live_mandelboxes = i.live_mandelboxes + 1
    FROM picked WHERE i.instance_name = picked.instance_name
    RETURNING i.instance_name, i.ip, i.region
), created AS (
    INSERT INTO ref_mandelboxes (mandelbox_id, instance_name, user_id, status)
    SELECT %(mandelbox_id)s, taken.instance_name, %(user_id)s, 'ALLOCATED' FROM taken
    RETURNING 1
)
SELECT (SELECT n FROM live), taken.instance_name, taken.ip, taken.region
FROM (SELECT 1) AS one LEFT JOIN taken ON true
"""


@app.post("/assign-floor")
def assign_floor() -> tuple[dict[str, Any], int]:
    wanted = _assign_request()
    if not isinstance(wanted, _AssignRequest):
        return wanted
    max_per_user = wanted.max_per_user
    mandelbox_id = str(uuid.uuid4())
    with _connection(autocommit=True) as connection, connection.cursor() as cursor:
        cursor.execute(
            FLOOR_SQL,
            {
                "user_id": wanted.user_id,
                "regions": wanted.regions,
                "commit": wanted.commit,
                "max_per_user": max_per_user,
                "mandelbox_id": mandelbox_id,
            },
        )
        live, name, ip, region = cursor.fetchone()
    if name is not None:
        body = {"mandelbox_id": mandelbox_id, "ip": ip, "region": region, "instance_name": name, "status": "ALLOCATED"}
        return _answer(body, 201)
    if live >= max_per_user:
        return _answer({"error": "USER_ALREADY_ACTIVE"}, 409)
    return _answer({"error": "NO_INSTANCE_AVAILABLE"}, 503)


@app.post("/heartbeat")
def heartbeat() -> tuple[dict[str, Any], int]:
    secret = _bearer()
    body = request.get_json(silent=True)
    if secret is None or not isinstance(body, dict) or not isinstance(body.get("instance_name"), str):
        return _answer({"error": "UNAUTHORIZED"}, 401)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    with _connection() as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT instance_name, status FROM ref_instances WHERE host_secret_hash = %s AND status <> 'TERMINATED'",
            (digest,),
        )
        found = cursor.fetchone()
        if found is None or found[0] != body["instance_name"]:
            connection.rollback()
            return _answer({"error": "UNAUTHORIZED"}, 401)
        cursor.execute(
            """
            INSERT INTO ref_heartbeats (instance_name, last_heartbeat_at, metrics) VALUES (%s, now(), %s)
            ON CONFLICT (instance_name) DO UPDATE
                SET last_heartbeat_at = EXCLUDED.last_heartbeat_at, metrics = EXCLUDED.metrics
            """,
            (found[0], json.dumps(body.get("metrics") or {})),
        )
        connection.commit()
    return _answer({"status": found[1], "heartbeat_interval_s": HEARTBEAT_INTERVAL_S, "stop_mandelboxes": []}, 200)


# /heartbeat's lookup and upsert as one statement: the instance's status when the secret and the name match (no row
# otherwise, and then nothing is written).
HEARTBEAT_FLOOR_SQL = """
WITH found AS (
    SELECT instance_name, status FROM ref_instances
    WHERE host_secret_hash = %(digest)s AND instance_name = %(instance_name)s AND status <> 'TERMINATED'
), beat AS (
    INSERT INTO ref_heartbeats (instance_name, last_heartbeat_at, metrics)
    SELECT instance_name, now(), %(metrics)s::jsonb FROM found
    ON CONFLICT (instance_name) DO UPDATE
        SET last_heartbeat_at = EXCLUDED.last_heartbeat_at, metrics = EXCLUDED.metrics
    RETURNING 1
)
SELECT status FROM found
"""


@app.post("/heartbeat-floor")
def heartbeat_floor() -> tuple[dict[str, Any], int]:
    secret = _bearer()
    body = request.get_json(silent=True)
    if secret is None or not isinstance(body, dict) or not isinstance(body.get("instance_name"), str):
        return _answer({"error": "UNAUTHORIZED"}, 401)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    with _connection(autocommit=True) as connection, connection.cursor() as cursor:
        cursor.execute(
            HEARTBEAT_FLOOR_SQL,
            {
                "digest": digest,
                "instance_name": body["instance_name"],
                "metrics": json.dumps(body.get("metrics") or {}),
            },
        )
        found = cursor.fetchone()
    if found is None:
        return _answer({"error": "UNAUTHORIZED"}, 401)
    return _answer({"status": found[0], "heartbeat_interval_s": HEARTBEAT_INTERVAL_S, "stop_mandelboxes": []}, 200)
