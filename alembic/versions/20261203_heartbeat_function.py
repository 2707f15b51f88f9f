"""The heartbeat's statements as a PL/pgSQL function, so their plans are kept per connection instead of being
parsed and planned on every heartbeat (fractal.host_service.service, HEARTBEAT_FUNCTION)

Revision ID: 20261203_0009_heartbeat
Revises: 20261202_0008_first_choice
Create Date: 2026-12-03 08:30:00
"""

from collections.abc import Sequence

from alembic import op


revision: str = "20261203_0009_heartbeat"
down_revision: str | None = "20261202_0008_first_choice"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen: what fractal.host_service.service.heartbeat_function_sql() built when this revision was written (a test
# checks the migrated body still equals it; a change to the statements comes with a revision that replaces it).
FUNCTION_SQL = """
CREATE OR REPLACE FUNCTION fractal_heartbeat(p_instance_name text, p_digest text, p_now timestamptz, p_metrics jsonb, p_reported uuid[])
RETURNS TABLE (instance_status text, dying uuid[], still_live uuid[])
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
BEGIN
    IF p_digest IS NULL THEN
        RETURN QUERY WITH beat AS (
    INSERT INTO heartbeats (instance_name, last_heartbeat_at, metrics)
    VALUES (p_instance_name, p_now, p_metrics)
    ON CONFLICT (instance_name) DO UPDATE
        SET last_heartbeat_at = EXCLUDED.last_heartbeat_at, metrics = EXCLUDED.metrics
    RETURNING instance_name
)
SELECT i.status::text, boxes.dying, boxes.still_live
FROM instances i JOIN beat ON beat.instance_name = i.instance_name, LATERAL (
    SELECT array_agg(m.mandelbox_id) FILTER (WHERE m.status = 'DYING') AS dying,
           array_agg(m.mandelbox_id) FILTER (WHERE m.mandelbox_id = ANY(p_reported)) AS still_live
    FROM mandelboxes m WHERE m.instance_name = p_instance_name AND m.status <> 'EXITED'
) AS boxes;
    ELSE
        RETURN QUERY WITH host AS (
    SELECT instance_name, status FROM instances
    WHERE instance_name = p_instance_name AND host_secret_hash = p_digest AND status <> 'TERMINATED'
), beat AS (
    INSERT INTO heartbeats (instance_name, last_heartbeat_at, metrics)
    SELECT host.instance_name, p_now, p_metrics FROM host
    ON CONFLICT (instance_name) DO UPDATE
        SET last_heartbeat_at = EXCLUDED.last_heartbeat_at, metrics = EXCLUDED.metrics
)
SELECT host.status::text, boxes.dying, boxes.still_live
FROM host, LATERAL (
    SELECT array_agg(m.mandelbox_id) FILTER (WHERE m.status = 'DYING') AS dying,
           array_agg(m.mandelbox_id) FILTER (WHERE m.mandelbox_id = ANY(p_reported)) AS still_live
    FROM mandelboxes m WHERE m.instance_name = p_instance_name AND m.status <> 'EXITED'
) AS boxes;
    END IF;
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite records heartbeats with portable statements
    op.execute(FUNCTION_SQL)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS fractal_heartbeat(text, text, timestamptz, jsonb, uuid[])")
