"""initial schema

Revision ID: 20261123_0001
Revises:
Create Date: 2026-11-23 18:16:22.383994
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "20261123_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("instance_name", sa.String(length=128), nullable=True),
        sa.Column("mandelbox_id", sa.Uuid(), nullable=True),
        sa.Column(
            "detail",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index("ix_events_created_at", "events", ["created_at"], unique=False)
    op.create_index(op.f("ix_events_instance_name"), "events", ["instance_name"], unique=False)
    op.create_table(
        "idempotency_keys",
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=False),
        sa.Column(
            "response_body",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("mandelbox_id", sa.Uuid(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "key", name=op.f("pk_idempotency_keys")),
    )
    op.create_index("ix_idempotency_keys_expires_at", "idempotency_keys", ["expires_at"], unique=False)
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("region", sa.String(length=64), nullable=False),
        sa.Column("client_commit_hash", sa.String(length=64), nullable=False),
        sa.Column("ami_id", sa.String(length=128), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("instance_type", sa.String(length=64), nullable=False),
        sa.Column("mandelbox_capacity", sa.Integer(), nullable=False),
        sa.Column("target_free", sa.Integer(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.CheckConstraint("mandelbox_capacity > 0", name=op.f("ck_images_capacity_positive")),
        sa.CheckConstraint("target_free IS NULL OR target_free >= 0", name=op.f("ck_images_target_free_non_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("region", "client_commit_hash", name="uq_images_region_client_commit_hash"),
    )
    op.create_table(
        "instances",
        sa.Column("instance_name", sa.String(length=128), nullable=False),
        sa.Column("cloud_provider_id", sa.String(length=128), nullable=True),
        sa.Column("region", sa.String(length=64), nullable=False),
        sa.Column("client_commit_hash", sa.String(length=64), nullable=False),
        sa.Column("ami_id", sa.String(length=128), nullable=False),
        sa.Column("instance_type", sa.String(length=64), nullable=False),
        sa.Column("ip", sa.String(length=64), nullable=True),
        sa.Column("mandelbox_capacity", sa.Integer(), nullable=False),
        sa.Column("live_mandelboxes", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "PRE_CONNECTION",
                "ACTIVE",
                "DRAINING",
                "TERMINATING",
                "TERMINATED",
                "LOST",
                name="instance_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("host_secret_hash", sa.String(length=128), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.Column(
            "status_changed_at", sa.DateTime(timezone=True), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.Column("empty_since", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "live_mandelboxes >= 0 AND live_mandelboxes <= mandelbox_capacity",
            name=op.f("ck_instances_live_within_capacity"),
        ),
        sa.CheckConstraint("mandelbox_capacity >= 0", name=op.f("ck_instances_capacity_non_negative")),
        sa.PrimaryKeyConstraint("instance_name", name=op.f("pk_instances")),
        sa.UniqueConstraint("cloud_provider_id", name=op.f("uq_instances_cloud_provider_id")),
        sa.UniqueConstraint("host_secret_hash", name=op.f("uq_instances_host_secret_hash")),
    )
    op.create_index(
        "ix_instances_assignable",
        "instances",
        ["region", "client_commit_hash", "live_mandelboxes"],
        unique=False,
        postgresql_where=sa.text("status = 'ACTIVE'"),
        sqlite_where=sa.text("status = 'ACTIVE'"),
    )
    op.create_index("ix_instances_status", "instances", ["status"], unique=False)
    op.create_table(
        "newsletter_subscriptions",
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "PENDING",
                "CONFIRMED",
                "UNSUBSCRIBED",
                name="subscription_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("unsubscribed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("email", name=op.f("pk_newsletter_subscriptions")),
    )
    op.create_table(
        "heartbeats",
        sa.Column("instance_name", sa.String(length=128), nullable=False),
        sa.Column(
            "last_heartbeat_at", sa.DateTime(timezone=True), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.Column(
            "metrics",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["instance_name"],
            ["instances.instance_name"],
            name=op.f("fk_heartbeats_instance_name_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("instance_name", name=op.f("pk_heartbeats")),
    )
    op.create_table(
        "mandelboxes",
        sa.Column("mandelbox_id", sa.Uuid(), nullable=False),
        sa.Column("instance_name", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "ALLOCATED",
                "CONNECTING",
                "RUNNING",
                "DYING",
                "EXITED",
                name="mandelbox_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.Column(
            "status_changed_at", sa.DateTime(timezone=True), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "end_reason",
            sa.Enum(
                "USER_DELETED",
                "HOST_EXITED",
                "HOST_LOST",
                "CLAIM_TIMEOUT",
                "INSTANCE_TERMINATED",
                name="end_reason",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=True,
        ),
        sa.CheckConstraint(
            "(status = 'EXITED') = (ended_at IS NOT NULL)", name=op.f("ck_mandelboxes_ended_at_iff_exited")
        ),
        sa.ForeignKeyConstraint(
            ["instance_name"],
            ["instances.instance_name"],
            name=op.f("fk_mandelboxes_instance_name_instances"),
        ),
        sa.PrimaryKeyConstraint("mandelbox_id", name=op.f("pk_mandelboxes")),
    )
    op.create_index(
        "ix_mandelboxes_live_instance",
        "mandelboxes",
        ["instance_name", "status"],
        unique=False,
        postgresql_where=sa.text("status <> 'EXITED'"),
        sqlite_where=sa.text("status <> 'EXITED'"),
    )
    op.create_index(
        "ix_mandelboxes_live_user",
        "mandelboxes",
        ["user_id"],
        unique=False,
        postgresql_where=sa.text("status <> 'EXITED'"),
        sqlite_where=sa.text("status <> 'EXITED'"),
    )
    op.create_index("ix_mandelboxes_user_created", "mandelboxes", ["user_id", "created_at"], unique=False)
    op.create_table(
        "log_uploads",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("mandelbox_id", sa.Uuid(), nullable=False),
        sa.Column(
            "sender",
            sa.Enum("host", "client", name="log_sender", native_enum=False, create_constraint=True, length=32),
            nullable=False,
        ),
        sa.Column("key", sa.String(length=512), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column(
            "uploaded_at", sa.DateTime(timezone=True), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["mandelbox_id"],
            ["mandelboxes.mandelbox_id"],
            name=op.f("fk_log_uploads_mandelbox_id_mandelboxes"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_log_uploads")),
        sa.UniqueConstraint("key", name=op.f("uq_log_uploads_key")),
    )
    op.create_index(op.f("ix_log_uploads_mandelbox_id"), "log_uploads", ["mandelbox_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_log_uploads_mandelbox_id"), table_name="log_uploads")
    op.drop_table("log_uploads")
    op.drop_index("ix_mandelboxes_user_created", table_name="mandelboxes")
    op.drop_index(
        "ix_mandelboxes_live_user",
        table_name="mandelboxes",
        postgresql_where=sa.text("status <> 'EXITED'"),
        sqlite_where=sa.text("status <> 'EXITED'"),
    )
    op.drop_index(
        "ix_mandelboxes_live_instance",
        table_name="mandelboxes",
        postgresql_where=sa.text("status <> 'EXITED'"),
        sqlite_where=sa.text("status <> 'EXITED'"),
    )
    op.drop_table("mandelboxes")
    op.drop_table("heartbeats")
    op.drop_table("newsletter_subscriptions")
    op.drop_index("ix_instances_status", table_name="instances")
    op.drop_index(
        "ix_instances_assignable",
        table_name="instances",
        postgresql_where=sa.text("status = 'ACTIVE'"),
        sqlite_where=sa.text("status = 'ACTIVE'"),
    )
    op.drop_table("instances")
    op.drop_table("images")
    op.drop_index("ix_idempotency_keys_expires_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_index(op.f("ix_events_instance_name"), table_name="events")
    op.drop_index("ix_events_created_at", table_name="events")
    op.drop_table("events")
