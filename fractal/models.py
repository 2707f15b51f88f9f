"""Every table Fractal stores, typed. Alembic migrations mirror this module exactly (`alembic check`)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fractal.clock import UtcDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on Postgres (indexable, compact), plain JSON on SQLite.
JSONDocument = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _enum(enum_cls: type[enum.StrEnum], name: str) -> Enum:
    # VARCHAR + named CHECK rather than a native PG enum: adding a state later is a plain migration.
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


def _now() -> Any:
    # CURRENT_TIMESTAMP is understood by Postgres and SQLite alike (the embedded default); now() is not.
    return text("CURRENT_TIMESTAMP")


class InstanceStatus(enum.StrEnum):
    PRE_CONNECTION = "PRE_CONNECTION"
    ACTIVE = "ACTIVE"
    DRAINING = "DRAINING"
    TERMINATING = "TERMINATING"
    TERMINATED = "TERMINATED"
    LOST = "LOST"


class MandelboxStatus(enum.StrEnum):
    ALLOCATED = "ALLOCATED"
    CONNECTING = "CONNECTING"
    RUNNING = "RUNNING"
    DYING = "DYING"
    EXITED = "EXITED"


class EndReason(enum.StrEnum):
    USER_DELETED = "USER_DELETED"
    HOST_EXITED = "HOST_EXITED"
    HOST_LOST = "HOST_LOST"
    CLAIM_TIMEOUT = "CLAIM_TIMEOUT"
    INSTANCE_TERMINATED = "INSTANCE_TERMINATED"


class SubscriptionStatus(enum.StrEnum):
    PENDING = "PENDING"
    CONFIRMED = "CONFIRMED"
    UNSUBSCRIBED = "UNSUBSCRIBED"


class LogSender(enum.StrEnum):
    HOST = "host"
    CLIENT = "client"


LIVE_MANDELBOX_STATUSES = (
    MandelboxStatus.ALLOCATED,
    MandelboxStatus.CONNECTING,
    MandelboxStatus.RUNNING,
    MandelboxStatus.DYING,
)


class Image(Base):
    """A machine image for one client version in one region. Active images enable their region."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("region", "client_commit_hash", name="uq_images_region_client_commit_hash"),
        CheckConstraint("mandelbox_capacity > 0", name="capacity_positive"),
        CheckConstraint("target_free IS NULL OR target_free >= 0", name="target_free_non_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    region: Mapped[str] = mapped_column(String(64))
    client_commit_hash: Mapped[str] = mapped_column(String(64))
    ami_id: Mapped[str] = mapped_column(String(128))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    instance_type: Mapped[str] = mapped_column(String(64))
    mandelbox_capacity: Mapped[int] = mapped_column(Integer)
    target_free: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # How the free-slot target is chosen (fractal.scaling.policy.BufferPolicy as JSON); NULL: target_free, static.
    buffer_policy: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), server_default=_now())

    def __repr__(self) -> str:
        return f"<Image {self.region}/{self.client_commit_hash} active={self.active}>"


# Free space left in each page of `instances` for HOT updates of the live count (see ix_instances_assignable).
INSTANCES_FILLFACTOR = 70


class Instance(Base):
    """One cloud host. ``live_mandelboxes`` is kept in the assign transaction; the CHECK makes overfill impossible."""

    __tablename__ = "instances"
    __table_args__ = (
        CheckConstraint("mandelbox_capacity >= 0", name="capacity_non_negative"),
        CheckConstraint(
            "live_mandelboxes >= 0 AND live_mandelboxes <= mandelbox_capacity", name="live_within_capacity"
        ),
        # The assignment hot path: ACTIVE candidates per (region, version); sorting the few by fullness is cheap.
        # live_mandelboxes is deliberately not indexed: every assign and exit changes it, and an update that
        # touches no indexed column can be HOT (no index writes, dead versions pruned in-page), which keeps the
        # hot rows from bloating as mandelboxes pile up. The table's fillfactor leaves room for that.
        Index(
            "ix_instances_assignable",
            "region",
            "client_commit_hash",
            postgresql_where=text("status = 'ACTIVE'"),
            sqlite_where=text("status = 'ACTIVE'"),
        ),
        Index("ix_instances_status", "status"),
        # The purge's walk over TERMINATED hosts, oldest first (status is indexed already, so no HOT update is lost).
        Index(
            "ix_instances_terminated_at",
            "status_changed_at",
            postgresql_where=text("status = 'TERMINATED'"),
            sqlite_where=text("status = 'TERMINATED'"),
        ),
        {"postgresql_with": {"fillfactor": INSTANCES_FILLFACTOR}},
    )

    instance_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    cloud_provider_id: Mapped[str | None] = mapped_column(String(128), nullable=True, unique=True)
    region: Mapped[str] = mapped_column(String(64))
    client_commit_hash: Mapped[str] = mapped_column(String(64))
    ami_id: Mapped[str] = mapped_column(String(128))
    instance_type: Mapped[str] = mapped_column(String(64))
    ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    mandelbox_capacity: Mapped[int] = mapped_column(Integer)
    live_mandelboxes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    status: Mapped[InstanceStatus] = mapped_column(_enum(InstanceStatus, "instance_status"))
    host_secret_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), server_default=_now())
    status_changed_at: Mapped[datetime] = mapped_column(UtcDateTime(), server_default=_now())
    # Set when the last live mandelbox leaves, cleared on assignment: the scaler's scale-down cool-down.
    empty_since: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)

    def __repr__(self) -> str:
        return (
            f"<Instance {self.instance_name} {self.status} "
            f"{self.live_mandelboxes}/{self.mandelbox_capacity} {self.region}>"
        )


class Heartbeat(Base):
    """Last heartbeat per instance, in its own table so heartbeats never lock the rows assignment locks."""

    __tablename__ = "heartbeats"

    instance_name: Mapped[str] = mapped_column(
        String(128), ForeignKey("instances.instance_name", ondelete="CASCADE"), primary_key=True
    )
    last_heartbeat_at: Mapped[datetime] = mapped_column(UtcDateTime(), server_default=_now())
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONDocument, default=dict)

    def __repr__(self) -> str:
        return f"<Heartbeat {self.instance_name} at {self.last_heartbeat_at}>"


# Mandelboxes waiting on their host: allocated and not yet claimed, or dying and not yet confirmed EXITED. A
# sweep ends those stuck too long (``fractal.fleet.sweeps``); its read states this same SQL, so that SQLite, which
# uses a partial index only for a query that states the index's condition, finds them on ix_mandelboxes_transient.
TRANSIENT_MANDELBOXES = "status IN ('ALLOCATED', 'DYING')"


class Mandelbox(Base):
    """One container streaming one app to one user. Rows are kept after exit as history."""

    __tablename__ = "mandelboxes"
    __table_args__ = (
        CheckConstraint("(status = 'EXITED') = (ended_at IS NOT NULL)", name="ended_at_iff_exited"),
        # Per-user live count (the USER_ALREADY_ACTIVE check) must not scan history.
        Index(
            "ix_mandelboxes_live_user",
            "user_id",
            postgresql_where=text("status <> 'EXITED'"),
            sqlite_where=text("status <> 'EXITED'"),
        ),
        # Live mandelboxes per instance (sweeps, heartbeat answers, drains).
        Index(
            "ix_mandelboxes_live_instance",
            "instance_name",
            "status",
            postgresql_where=text("status <> 'EXITED'"),
            sqlite_where=text("status <> 'EXITED'"),
        ),
        Index("ix_mandelboxes_user_created", "user_id", "created_at"),
        # The sweeps' "is any mandelbox stuck" (every scaler pass): the few boxes waiting on their host, by age,
        # rather than a walk over every live one.
        Index(
            "ix_mandelboxes_transient",
            "status_changed_at",
            postgresql_where=text(TRANSIENT_MANDELBOXES),
            sqlite_where=text(TRANSIENT_MANDELBOXES),
        ),
        # The purge: ended boxes oldest first, and "does any ended box still reference this instance".
        Index(
            "ix_mandelboxes_exited_ended_at",
            "ended_at",
            postgresql_where=text("status = 'EXITED'"),
            sqlite_where=text("status = 'EXITED'"),
        ),
        Index(
            "ix_mandelboxes_exited_instance",
            "instance_name",
            postgresql_where=text("status = 'EXITED'"),
            sqlite_where=text("status = 'EXITED'"),
        ),
    )

    mandelbox_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    instance_name: Mapped[str] = mapped_column(String(128), ForeignKey("instances.instance_name"))
    user_id: Mapped[str] = mapped_column(String(255))
    session_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    status: Mapped[MandelboxStatus] = mapped_column(_enum(MandelboxStatus, "mandelbox_status"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), server_default=_now())
    status_changed_at: Mapped[datetime] = mapped_column(UtcDateTime(), server_default=_now())
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    end_reason: Mapped[EndReason | None] = mapped_column(_enum(EndReason, "end_reason"), nullable=True)

    def __repr__(self) -> str:
        return f"<Mandelbox {self.mandelbox_id} {self.status} on {self.instance_name}>"


class Event(Base):
    """Append-only audit log: lifecycle changes, refusals, scaler decisions."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_created_at", "created_at"),
        # The scaler's demand reads, every pass: one or two kinds over a time range (activations over six hours
        # would otherwise walk every event of those hours).
        Index("ix_events_kind_created_at", "kind", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), server_default=_now())
    kind: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(255))
    instance_name: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    mandelbox_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONDocument, default=dict)

    def __repr__(self) -> str:
        return f"<Event {self.id} {self.kind} by {self.actor}>"


class IdempotencyKey(Base):
    """(user, key) → the answer the first request got, written in the same transaction as its mandelbox."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_expires_at", "expires_at"),)

    user_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    mandelbox_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), server_default=_now())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())

    def __repr__(self) -> str:
        return f"<IdempotencyKey {self.user_id}/{self.key} → {self.response_status}>"


class NewsletterSubscription(Base):
    """One address on the newsletter list; confirmed through a signed link."""

    __tablename__ = "newsletter_subscriptions"

    email: Mapped[str] = mapped_column(String(320), primary_key=True)
    status: Mapped[SubscriptionStatus] = mapped_column(_enum(SubscriptionStatus, "subscription_status"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), server_default=_now())
    confirmed_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    unsubscribed_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)

    def __repr__(self) -> str:
        return f"<NewsletterSubscription {self.status}>"


class LogUpload(Base):
    """A protocol log stored in object storage for one mandelbox, uploaded by its host or its client."""

    __tablename__ = "log_uploads"
    __table_args__ = (Index("ix_log_uploads_uploaded_at", "uploaded_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    mandelbox_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("mandelboxes.mandelbox_id"), index=True)
    sender: Mapped[LogSender] = mapped_column(_enum(LogSender, "log_sender"))
    key: Mapped[str] = mapped_column(String(512), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    uploaded_at: Mapped[datetime] = mapped_column(UtcDateTime(), server_default=_now())

    def __repr__(self) -> str:
        return f"<LogUpload {self.key} ({self.size} bytes)>"


class Lease(Base):
    """Leadership of a singleton job (the scaler): who holds it, until when, and a token that grows on every
    change of holder, so a former leader's late actions can be told from the current one's (fencing)."""

    __tablename__ = "leases"
    __table_args__ = (CheckConstraint("fencing_token > 0", name="fencing_token_positive"),)

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    fencing_token: Mapped[int] = mapped_column(BigInteger)
    acquired_at: Mapped[datetime] = mapped_column(UtcDateTime(), server_default=_now())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())

    def __repr__(self) -> str:
        return f"<Lease {self.name} held by {self.holder} (token {self.fencing_token})>"


class ApiKey(Base):
    """An operator's API key for automation. ``id`` is the key's public lookup part (``fk_<id>_<secret>``); only a
    SHA-256 digest of the whole key is stored. Rows are kept after revocation (``revoked_at``) as history."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    digest: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JSONDocument)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), server_default=_now())
    created_by: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)

    def __repr__(self) -> str:
        return f"<ApiKey {self.id} {self.name!r} {self.scopes}>"
