"""Mandelboxes waiting on their host (ALLOCATED or DYING) by age: the sweeps' "is any mandelbox stuck" read, every
scaler pass, seeks the few waiting boxes instead of walking every live one

A plain CREATE INDEX (like 20261202_0005's and 20261202_0007's): the migration runs inside the one transaction that
holds the migration lock (env.py), which CREATE INDEX CONCURRENTLY cannot. Building it reads the whole mandelboxes
table and holds off writes to it meanwhile (a few seconds per million rows); the index itself holds only the
transient rows.

Revision ID: 20261204_0010_transient
Revises: 20261203_0009_heartbeat
Create Date: 2026-12-04 20:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "20261204_0010_transient"
down_revision: str | None = "20261203_0009_heartbeat"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen: fractal.models.TRANSIENT_MANDELBOXES when this revision was written.
TRANSIENT = "status IN ('ALLOCATED', 'DYING')"


def upgrade() -> None:
    op.create_index(
        "ix_mandelboxes_transient",
        "mandelboxes",
        ["status_changed_at"],
        postgresql_where=sa.text(TRANSIENT),
        sqlite_where=sa.text(TRANSIENT),
    )


def downgrade() -> None:
    op.drop_index("ix_mandelboxes_transient", table_name="mandelboxes")
