"""Let live-count updates of instances be HOT: drop live_mandelboxes from the assignable index, fillfactor 70

Every assign and every exit updates instances.live_mandelboxes. While that column was indexed, each update
wrote new index entries and left dead row versions that only vacuum could clear, so the few hot rows bloated
and assignment slowed down as mandelboxes piled up. Without it, updates can be HOT (heap-only): no index writes,
dead versions pruned within the page, for which fillfactor leaves room.

Revision ID: 20261123_0002
Revises: 20261123_0001
Create Date: 2026-11-23 19:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261123_0002"
down_revision: str | None = "20261123_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("status = 'ACTIVE'")


def upgrade() -> None:
    op.drop_index("ix_instances_assignable", table_name="instances", postgresql_where=ACTIVE, sqlite_where=ACTIVE)
    op.create_index(
        "ix_instances_assignable",
        "instances",
        ["region", "client_commit_hash"],
        unique=False,
        postgresql_where=ACTIVE,
        sqlite_where=ACTIVE,
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE instances SET (fillfactor = 70)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE instances RESET (fillfactor)")
    op.drop_index("ix_instances_assignable", table_name="instances", postgresql_where=ACTIVE, sqlite_where=ACTIVE)
    op.create_index(
        "ix_instances_assignable",
        "instances",
        ["region", "client_commit_hash", "live_mandelboxes"],
        unique=False,
        postgresql_where=ACTIVE,
        sqlite_where=ACTIVE,
    )
