"""Indexes for the history purge: ended mandelboxes by end time and by instance, TERMINATED instances by when they
ended, log uploads by upload time

Revision ID: 20261202_0005
Revises: 20261202_0004
Create Date: 2026-12-02 06:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "20261202_0005"
down_revision: str | None = "20261202_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    exited = sa.text("status = 'EXITED'")
    terminated = sa.text("status = 'TERMINATED'")
    op.create_index(
        "ix_mandelboxes_exited_ended_at", "mandelboxes", ["ended_at"], postgresql_where=exited, sqlite_where=exited
    )
    op.create_index(
        "ix_mandelboxes_exited_instance",
        "mandelboxes",
        ["instance_name"],
        postgresql_where=exited,
        sqlite_where=exited,
    )
    op.create_index(
        "ix_instances_terminated_at",
        "instances",
        ["status_changed_at"],
        postgresql_where=terminated,
        sqlite_where=terminated,
    )
    op.create_index("ix_log_uploads_uploaded_at", "log_uploads", ["uploaded_at"])


def downgrade() -> None:
    op.drop_index("ix_log_uploads_uploaded_at", table_name="log_uploads")
    op.drop_index("ix_instances_terminated_at", table_name="instances")
    op.drop_index("ix_mandelboxes_exited_instance", table_name="mandelboxes")
    op.drop_index("ix_mandelboxes_exited_ended_at", table_name="mandelboxes")
