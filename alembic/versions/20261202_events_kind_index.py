"""Events by kind and time: the scaler's demand reads (launch lead times over six hours, arrivals over the buffer
window, users waiting now) each want one or two kinds in a time range

Revision ID: 20261202_0007_sim
Revises: 20261202_0006
Create Date: 2026-12-02 10:55:00
"""

from collections.abc import Sequence

from alembic import op


revision: str = "20261202_0007_sim"
down_revision: str | None = "20261202_0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_events_kind_created_at", "events", ["kind", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_events_kind_created_at", table_name="events")
