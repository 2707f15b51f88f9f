"""History that does not grow for ever: what has ended is kept for a retention period, then purged in batches.

What is purged, in this order (children before the rows they reference, so no foreign key ever blocks a batch):

- ``idempotency_keys``: keys expired more than ``FRACTAL_RETENTION_IDEMPOTENCY_KEYS_HOURS`` ago (default 0: as soon
  as they expire; an expired key is never replayed, and assign also drops a few expired keys as it goes).
- ``events``: audit events older than their retention (no foreign keys point at them or from them).
- ``log_uploads``: log rows older than their retention, with their objects deleted from the bucket first when
  ``FRACTAL_RETENTION_DELETE_LOG_OBJECTS`` is on (otherwise a bucket lifecycle rule is expected to expire them).
- ``mandelboxes``: EXITED mandelboxes that ended longer ago than their retention and hold no log row any more (a
  mandelbox is kept while one of its logs is). Live mandelboxes are never touched, whatever their age.
- ``heartbeats``: the last heartbeat of hosts TERMINATED longer ago than their retention.
- ``instances``: TERMINATED instances past their retention that no mandelbox references any more (their heartbeat
  goes with them, ``ON DELETE CASCADE``). No other status is ever purged.

Every batch is one short transaction of one ``DELETE ... WHERE key IN (SELECT key ... ORDER BY <time> LIMIT n FOR
UPDATE SKIP LOCKED)`` on an index over the time column, so a batch never scans a table, never waits for a row a
request holds, holds its locks for milliseconds and carries no session state (it works through PgBouncer's
transaction pooling). Every cut-off is the database's clock (``db_now``), never this process's. A run stops after
``FRACTAL_PURGE_MAX_S`` or when ``should_continue`` says so (the scaler's lease was lost); the next run goes on.
After every full batch it pauses ``FRACTAL_PURGE_PAUSE_MS``, so a long purge leaves the database room for requests.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import structlog
from sqlalchemy import ColumnElement, Delete, Select, any_, delete, exists, func, literal_column, select, tuple_
from sqlalchemy.orm import Session

from fractal.clock import db_now
from fractal.config import Settings
from fractal.database import is_postgres
from fractal.models import (
    Event,
    Heartbeat,
    IdempotencyKey,
    Instance,
    InstanceStatus,
    LogUpload,
    Mandelbox,
    MandelboxStatus,
)
from fractal.observability import redact_text

__all__ = [
    "DAY_S",
    "LogObjectStore",
    "PurgeKind",
    "PurgeReport",
    "RetentionPolicy",
    "S3LogObjects",
    "default_log_objects",
    "purge_history",
]

log = structlog.get_logger(__name__)

DAY_S = 86_400.0
# S3's DeleteObjects takes at most this many keys per call.
S3_DELETE_BATCH = 1_000


class PurgeKind(enum.StrEnum):
    """What a purge deletes, in the order it deletes it."""

    IDEMPOTENCY_KEYS = "idempotency_keys"
    EVENTS = "events"
    LOG_UPLOADS = "log_uploads"
    MANDELBOXES = "mandelboxes"
    HEARTBEATS = "heartbeats"
    INSTANCES = "instances"


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each kind is kept, in seconds (idempotency keys: after their expiry)."""

    events_s: float
    mandelboxes_s: float
    log_uploads_s: float
    heartbeats_s: float
    instances_s: float
    idempotency_keys_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        def days(override: float | None) -> float:
            return (settings.retention_days if override is None else override) * DAY_S

        return cls(
            events_s=days(settings.retention_events_days),
            mandelboxes_s=days(settings.retention_mandelboxes_days),
            log_uploads_s=days(settings.retention_log_uploads_days),
            heartbeats_s=days(settings.retention_heartbeats_days),
            instances_s=days(settings.retention_instances_days),
            idempotency_keys_s=settings.retention_idempotency_keys_hours * 3600.0,
        )


class LogObjectStore(Protocol):
    """Where log objects live; ``delete`` removes the given keys (a missing key is no error) or raises."""

    def delete(self, keys: Sequence[str]) -> None: ...


class S3LogObjects:
    """Log objects in an S3 bucket (``DeleteObjects``, a thousand keys per call). Without a client, one is built
    on first use (honouring ``AWS_ENDPOINT_URL_S3`` like the upload path), so a process with no log to purge never
    needs S3 configured."""

    def __init__(self, bucket: str, s3: Any = None) -> None:
        self._s3 = s3
        self._bucket = bucket

    def delete(self, keys: Sequence[str]) -> None:
        if self._s3 is None:
            import boto3

            self._s3 = boto3.client("s3")
        for start in range(0, len(keys), S3_DELETE_BATCH):
            chunk = keys[start : start + S3_DELETE_BATCH]
            answer = self._s3.delete_objects(
                Bucket=self._bucket, Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True}
            )
            failed = answer.get("Errors") or []
            if failed:
                first = failed[0]
                raise RuntimeError(
                    f"S3 refused to delete {len(failed)} log object(s), e.g. {first.get('Key')}: {first.get('Code')}"
                )


def default_log_objects(settings: Settings) -> LogObjectStore | None:
    """The log objects a purge deletes: the configured bucket, or None when they are left to a lifecycle rule."""
    return S3LogObjects(settings.logs_bucket) if settings.retention_delete_log_objects else None


@dataclass
class PurgeReport:
    """What one purge run deleted, per kind; ``complete`` is False when it stopped before the end (time budget,
    lost lease) and there may be more to purge."""

    purged: dict[str, int] = field(default_factory=lambda: {kind.value: 0 for kind in PurgeKind})
    batches: int = 0
    duration_s: float = 0.0
    # The longest one batch took (its statements and commit): how long its row locks were held at most.
    slowest_batch_s: float = 0.0
    complete: bool = True
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.purged.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "purged": dict(self.purged),
            "total": self.total,
            "batches": self.batches,
            "duration_s": round(self.duration_s, 4),
            "slowest_batch_s": round(self.slowest_batch_s, 4),
            "complete": self.complete,
            "errors": list(self.errors),
        }


class _Stop(Exception):
    """The run's time budget is spent or it was told to stop."""


def purge_history(
    session: Session,
    *,
    settings: Settings,
    log_objects: LogObjectStore | None = None,
    should_continue: Callable[[], bool] | None = None,
    batch_size: int | None = None,
    max_s: float | None = None,
    on_batch: Callable[[PurgeKind, int], None] | None = None,
) -> PurgeReport:
    """Purge everything past its retention, one committed batch at a time; the session must have nothing pending.

    Args:
        log_objects: where log objects are deleted before their rows (None: rows only; the bucket's lifecycle
            rule is trusted with the objects).
        should_continue: asked before every batch; False stops the run (the scaler passes "my lease holds").
        batch_size, max_s: default ``FRACTAL_PURGE_BATCH_SIZE`` and ``FRACTAL_PURGE_MAX_S``.
        on_batch: told each committed batch's kind and row count (metrics).

    Returns:
        Counts per kind. A kind whose batch failed (S3 down, a timeout) is noted in ``errors`` and left for the
        next run; the kinds after it are still purged (their rows are only purged when nothing references them).
    """
    policy = RetentionPolicy.from_settings(settings)
    size = batch_size or settings.purge_batch_size
    deadline = time.monotonic() + (settings.purge_max_s if max_s is None else max_s)
    report = PurgeReport()
    started = time.perf_counter()
    postgres = is_postgres(session)
    pause_s = settings.purge_pause_ms / 1000

    def proceed() -> None:
        # The time bound counts once a batch has deleted something, so every run makes some progress.
        if (report.total and time.monotonic() >= deadline) or (should_continue is not None and not should_continue()):
            raise _Stop

    def run(kind: PurgeKind, batch: Callable[[], int]) -> None:
        while True:
            proceed()
            began = time.perf_counter()
            count = batch()
            session.commit()
            report.slowest_batch_s = max(report.slowest_batch_s, time.perf_counter() - began)
            report.batches += 1
            report.purged[kind.value] += count
            if count and on_batch is not None:
                on_batch(kind, count)
            if count < size:
                return
            if pause_s:
                time.sleep(min(pause_s, max(0.0, deadline - time.monotonic())))

    def statement(kind: PurgeKind, keys: Select[Any]) -> Callable[[], int]:
        def batch() -> int:
            return _rowcount(session.execute(_delete_for(kind, keys, postgres=postgres)))

        return batch

    kinds: list[tuple[PurgeKind, Callable[[], int]]] = [
        (PurgeKind.IDEMPOTENCY_KEYS, statement(PurgeKind.IDEMPOTENCY_KEYS, _expired_keys(policy, size))),
        (PurgeKind.EVENTS, statement(PurgeKind.EVENTS, _old_events(policy, size))),
        (
            PurgeKind.LOG_UPLOADS,
            statement(PurgeKind.LOG_UPLOADS, _old_log_uploads(policy, size))
            if log_objects is None
            else _log_upload_batch(session, policy, size, log_objects),
        ),
        (PurgeKind.MANDELBOXES, statement(PurgeKind.MANDELBOXES, _ended_mandelboxes(policy, size))),
        (PurgeKind.HEARTBEATS, statement(PurgeKind.HEARTBEATS, _terminated_heartbeats(policy, size))),
        (PurgeKind.INSTANCES, statement(PurgeKind.INSTANCES, _terminated_instances(policy, size))),
    ]
    try:
        for kind, batch in kinds:
            try:
                run(kind, batch)
            except _Stop:
                raise
            except Exception as error:  # one kind's failure is reported; the next run retries it
                session.rollback()
                first = (str(error).strip().splitlines() or [""])[0]
                report.errors.append(f"{kind.value}: {type(error).__name__}: {redact_text(first)[:200]}")
                log.warning("purge.failed", kind=kind.value, error_type=type(error).__name__)
    except _Stop:
        session.rollback()
        report.complete = False
    report.duration_s = time.perf_counter() - started
    log.info("purge.done", **report.as_dict())
    return report


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


# --- which rows: each a keyset-limited SELECT over an index on the time column ------------------------------


def _expired_keys(policy: RetentionPolicy, size: int) -> Select[Any, Any]:
    return (
        select(IdempotencyKey.user_id, IdempotencyKey.key)
        .where(IdempotencyKey.expires_at <= db_now(-policy.idempotency_keys_s))
        .order_by(IdempotencyKey.expires_at)
        .limit(size)
    )


def _old_events(policy: RetentionPolicy, size: int) -> Select[Any]:
    return select(Event.id).where(Event.created_at < db_now(-policy.events_s)).order_by(Event.created_at).limit(size)


def _old_log_uploads(policy: RetentionPolicy, size: int) -> Select[Any]:
    return (
        select(LogUpload.id)
        .where(LogUpload.uploaded_at < db_now(-policy.log_uploads_s))
        .order_by(LogUpload.uploaded_at)
        .limit(size)
    )


def _ended_mandelboxes(policy: RetentionPolicy, size: int) -> Select[Any]:
    return (
        select(Mandelbox.mandelbox_id)
        .where(
            Mandelbox.status == MandelboxStatus.EXITED,
            Mandelbox.ended_at < db_now(-policy.mandelboxes_s),
            ~exists().where(LogUpload.mandelbox_id == Mandelbox.mandelbox_id),
        )
        .order_by(Mandelbox.ended_at)
        .limit(size)
    )


def _terminated_heartbeats(policy: RetentionPolicy, size: int) -> Select[Any]:
    return (
        select(Heartbeat.instance_name)
        .join(Instance, Instance.instance_name == Heartbeat.instance_name)
        .where(
            Instance.status == InstanceStatus.TERMINATED,
            Instance.status_changed_at < db_now(-policy.heartbeats_s),
        )
        .order_by(Instance.status_changed_at)
        .limit(size)
    )


def _terminated_instances(policy: RetentionPolicy, size: int) -> Select[Any]:
    # Two probes, one per partial index on mandelboxes.instance_name (live ones; EXITED ones).
    live = exists().where(Mandelbox.instance_name == Instance.instance_name, Mandelbox.status != MandelboxStatus.EXITED)
    ended = exists().where(
        Mandelbox.instance_name == Instance.instance_name, Mandelbox.status == MandelboxStatus.EXITED
    )
    return (
        select(Instance.instance_name)
        .where(
            Instance.status == InstanceStatus.TERMINATED,
            Instance.status_changed_at < db_now(-policy.instances_s),
            ~live,
            ~ended,
        )
        .order_by(Instance.status_changed_at)
        .limit(size)
    )


# --- the DELETEs -------------------------------------------------------------------------------------------

_LOCKED_TABLE: dict[PurgeKind, Any] = {
    PurgeKind.IDEMPOTENCY_KEYS: IdempotencyKey,
    PurgeKind.EVENTS: Event,
    PurgeKind.LOG_UPLOADS: LogUpload,
    PurgeKind.MANDELBOXES: Mandelbox,
    PurgeKind.HEARTBEATS: Heartbeat,
    PurgeKind.INSTANCES: Instance,
}


def _delete_for(kind: PurgeKind, keys: Select[Any], *, postgres: bool) -> Delete:
    """``DELETE ... WHERE key IN (keys)``. On Postgres the keys' rows are locked SKIP LOCKED, so a row a request
    holds (an instance being assigned to, a key being replayed) is left for a later batch, never waited for, and
    the keys are matched as ``key = ANY(ARRAY(keys))``: a primary-key lookup per row, where ``IN (subquery)`` may be
    planned as a hash join over the whole table. Idempotency keys (a two-column key) are matched by ``ctid``: their
    rows are only ever inserted and deleted, never updated, so a locked row's ctid is the row the batch chose."""
    if postgres:
        keys = keys.with_for_update(skip_locked=True, of=_LOCKED_TABLE[kind]).correlate(None)

    def matching(column: Any) -> ColumnElement[bool]:
        if not postgres:
            return cast(ColumnElement[bool], column.in_(keys))
        return cast(ColumnElement[bool], column == any_(func.array(keys.scalar_subquery())))

    statement: Delete
    if kind is PurgeKind.IDEMPOTENCY_KEYS:
        if postgres:
            keys = keys.with_only_columns(literal_column("idempotency_keys.ctid"))
            statement = delete(IdempotencyKey).where(matching(literal_column("ctid")))
        else:
            statement = delete(IdempotencyKey).where(tuple_(IdempotencyKey.user_id, IdempotencyKey.key).in_(keys))
    elif kind is PurgeKind.EVENTS:
        statement = delete(Event).where(matching(Event.id))
    elif kind is PurgeKind.LOG_UPLOADS:
        statement = delete(LogUpload).where(matching(LogUpload.id))
    elif kind is PurgeKind.MANDELBOXES:
        # Re-checked on the locked row version: only an EXITED box goes.
        statement = delete(Mandelbox).where(
            matching(Mandelbox.mandelbox_id), Mandelbox.status == MandelboxStatus.EXITED
        )
    elif kind is PurgeKind.HEARTBEATS:
        statement = delete(Heartbeat).where(matching(Heartbeat.instance_name))
    else:
        statement = delete(Instance).where(
            matching(Instance.instance_name), Instance.status == InstanceStatus.TERMINATED
        )
    return statement.execution_options(synchronize_session=False)


def _log_upload_batch(
    session: Session, policy: RetentionPolicy, size: int, objects: LogObjectStore
) -> Callable[[], int]:
    """Objects first, then rows: read a batch's keys (and end that read), delete the objects (no transaction is
    open across the call to S3), then delete the rows. A failure between the two leaves rows whose objects are
    gone; the next run deletes them again (deleting a missing object is no error)."""

    def batch() -> int:
        rows = session.execute(
            select(LogUpload.id, LogUpload.key)
            .where(LogUpload.uploaded_at < db_now(-policy.log_uploads_s))
            .order_by(LogUpload.uploaded_at)
            .limit(size)
        ).all()
        session.commit()
        if not rows:
            return 0
        objects.delete([row.key for row in rows])
        ids = [row.id for row in rows]
        return _rowcount(
            session.execute(delete(LogUpload).where(LogUpload.id.in_(ids)).execution_options(synchronize_session=False))
        )

    return batch
