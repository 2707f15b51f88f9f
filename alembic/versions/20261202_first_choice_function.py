"""The first-choice assign statement as a PL/pgSQL function, so its plans are kept per connection instead of the
statement being parsed and planned on every assign (fractal.fleet.mandelboxes, FIRST_CHOICE_FUNCTION)

Revision ID: 20261202_0008_first_choice
Revises: 20261202_0007_sim
Create Date: 2026-12-02 19:00:00
"""

from collections.abc import Sequence

from alembic import op


revision: str = "20261202_0008_first_choice"
down_revision: str | None = "20261202_0007_sim"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen: what fractal.fleet.mandelboxes.first_choice_function_sql() built when this revision was written (a test
# checks the migrated body still equals it; a change to the statement comes with a revision that replaces it).
FUNCTION_SQL = """
CREATE OR REPLACE FUNCTION fractal_first_choice(p_user_lock_key bigint, p_user_id text, p_region text, p_commit text, p_max_per_user integer, p_mandelbox_id text, p_session_id text, p_event_kind text, p_actor text, p_answer_key text, p_request_hash text, p_response_status integer, p_ttl_s integer, p_purge_batch integer)
RETURNS TABLE (live_count bigint, instance_name text, ip text, region text, request_hash text, response_body jsonb, expired boolean, room boolean, other_room boolean)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock(p_user_lock_key);
    IF p_answer_key IS NULL THEN
        RETURN QUERY WITH stored AS (
    SELECT NULL::text AS request_hash, NULL::jsonb AS response_body, false AS expired WHERE false
), live AS (
    SELECT count(*) AS n FROM mandelboxes WHERE user_id = p_user_id AND status <> 'EXITED'
), candidate AS (
    SELECT instance_name FROM instances
    WHERE region = p_region AND client_commit_hash = p_commit AND status = 'ACTIVE'
      AND live_mandelboxes < mandelbox_capacity
      AND (SELECT n FROM live) < p_max_per_user
      AND NOT EXISTS (SELECT 1 FROM stored WHERE NOT stored.expired)
    ORDER BY live_mandelboxes DESC, instance_name
    LIMIT 1
    FOR NO KEY UPDATE SKIP LOCKED
), taken AS (
    UPDATE instances SET live_mandelboxes = instances.live_mandelboxes + 1, empty_since = NULL
    FROM candidate WHERE instances.instance_name = candidate.instance_name
    RETURNING instances.instance_name, instances.ip, instances.region
), created AS (
    INSERT INTO mandelboxes (mandelbox_id, instance_name, user_id, session_id, status,
                             created_at, status_changed_at)
    SELECT CAST(p_mandelbox_id AS uuid), taken.instance_name, p_user_id, p_session_id, 'ALLOCATED', now(), now()
    FROM taken
    RETURNING mandelbox_id
), audited AS (
    INSERT INTO events (created_at, kind, actor, instance_name, mandelbox_id, detail)
    SELECT now(), p_event_kind, p_actor, taken.instance_name, CAST(p_mandelbox_id AS uuid),
           jsonb_build_object('region', taken.region, 'client_commit_hash', CAST(p_commit AS text))
    FROM taken
    RETURNING id
)
SELECT (SELECT n FROM live) AS live_count, taken.instance_name::text, taken.ip::text, taken.region::text,
       stored.request_hash::text, stored.response_body, stored.expired,
       CASE WHEN taken.instance_name IS NULL THEN EXISTS (
           SELECT 1 FROM instances WHERE region = p_region AND client_commit_hash = p_commit
             AND status = 'ACTIVE' AND live_mandelboxes < mandelbox_capacity) END AS room,
       CASE WHEN taken.instance_name IS NULL THEN EXISTS (
           SELECT 1 FROM instances WHERE region = p_region AND client_commit_hash <> p_commit
             AND status = 'ACTIVE' AND live_mandelboxes < mandelbox_capacity) END AS other_room
FROM (SELECT 1) AS one LEFT JOIN taken ON true LEFT JOIN stored ON true;
    ELSE
        RETURN QUERY WITH stored AS (
    SELECT request_hash, response_body, expires_at <= now() AS expired
    FROM idempotency_keys WHERE user_id = p_user_id AND key = p_answer_key
), live AS (
    SELECT count(*) AS n FROM mandelboxes WHERE user_id = p_user_id AND status <> 'EXITED'
), candidate AS (
    SELECT instance_name FROM instances
    WHERE region = p_region AND client_commit_hash = p_commit AND status = 'ACTIVE'
      AND live_mandelboxes < mandelbox_capacity
      AND (SELECT n FROM live) < p_max_per_user
      AND NOT EXISTS (SELECT 1 FROM stored WHERE NOT stored.expired)
    ORDER BY live_mandelboxes DESC, instance_name
    LIMIT 1
    FOR NO KEY UPDATE SKIP LOCKED
), taken AS (
    UPDATE instances SET live_mandelboxes = instances.live_mandelboxes + 1, empty_since = NULL
    FROM candidate WHERE instances.instance_name = candidate.instance_name
    RETURNING instances.instance_name, instances.ip, instances.region
), created AS (
    INSERT INTO mandelboxes (mandelbox_id, instance_name, user_id, session_id, status,
                             created_at, status_changed_at)
    SELECT CAST(p_mandelbox_id AS uuid), taken.instance_name, p_user_id, p_session_id, 'ALLOCATED', now(), now()
    FROM taken
    RETURNING mandelbox_id
), audited AS (
    INSERT INTO events (created_at, kind, actor, instance_name, mandelbox_id, detail)
    SELECT now(), p_event_kind, p_actor, taken.instance_name, CAST(p_mandelbox_id AS uuid),
           jsonb_build_object('region', taken.region, 'client_commit_hash', CAST(p_commit AS text))
    FROM taken
    RETURNING id
), kept AS (
    INSERT INTO idempotency_keys (user_id, key, request_hash, response_status, response_body, mandelbox_id,
                                  created_at, expires_at)
    SELECT p_user_id, p_answer_key, p_request_hash, p_response_status,
           jsonb_build_object('mandelbox_id', p_mandelbox_id::text, 'ip', taken.ip, 'region', taken.region,
                              'instance_name', taken.instance_name, 'status', 'ALLOCATED'),
           p_mandelbox_id::uuid, now(), now() + make_interval(secs => p_ttl_s)
    FROM taken
    ON CONFLICT (user_id, key) DO UPDATE
        SET request_hash = EXCLUDED.request_hash, response_status = EXCLUDED.response_status,
            response_body = EXCLUDED.response_body, mandelbox_id = EXCLUDED.mandelbox_id,
            created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
        WHERE idempotency_keys.expires_at <= now()
    RETURNING key
), purged AS (
    DELETE FROM idempotency_keys
    WHERE (user_id, key) IN (
        SELECT user_id, key FROM idempotency_keys
        WHERE expires_at <= now() AND NOT (user_id = p_user_id AND key = p_answer_key)
          AND EXISTS (SELECT 1 FROM taken)
        LIMIT p_purge_batch
        FOR UPDATE SKIP LOCKED
    ) AND expires_at <= now()
    RETURNING key
)
SELECT (SELECT n FROM live) AS live_count, taken.instance_name::text, taken.ip::text, taken.region::text,
       stored.request_hash::text, stored.response_body, stored.expired,
       CASE WHEN taken.instance_name IS NULL THEN EXISTS (
           SELECT 1 FROM instances WHERE region = p_region AND client_commit_hash = p_commit
             AND status = 'ACTIVE' AND live_mandelboxes < mandelbox_capacity) END AS room,
       CASE WHEN taken.instance_name IS NULL THEN EXISTS (
           SELECT 1 FROM instances WHERE region = p_region AND client_commit_hash <> p_commit
             AND status = 'ACTIVE' AND live_mandelboxes < mandelbox_capacity) END AS other_room
FROM (SELECT 1) AS one LEFT JOIN taken ON true LEFT JOIN stored ON true;
    END IF;
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite assigns through the general path
    op.execute(FUNCTION_SQL)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "DROP FUNCTION IF EXISTS fractal_first_choice(bigint, text, text, text, integer, text, text, text, text, text,"
        " text, integer, integer, integer)"
    )
