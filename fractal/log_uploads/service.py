"""Protocol logs from hosts and clients, streamed to S3 and indexed in ``log_uploads``.

A body is never held whole in memory: boto3's ``upload_fileobj`` reads it through :class:`CountingReader`
(at most one multipart part at a time, ``use_threads=False``). ``Content-Encoding: gzip`` bodies are
decompressed while they stream, so what is stored, counted against the limit and later downloaded is the
plain log; a decompression bomb stops at the limit like any other oversized body. Nothing is half-written:
a failed or oversized upload aborts the multipart upload (s3transfer's failure clean-up) and writes no row;
a row that cannot be written deletes its object again.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from fractal.clock import utcnow
from fractal.errors import (
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    ServiceUnavailableError,
    ValidationError,
)
from fractal.models import LogSender, LogUpload, Mandelbox

log = structlog.get_logger(__name__)

# One part in memory at a time; S3 wants parts of at least 5 MiB (all but the last).
PART_SIZE_BYTES = 8 * 1024 * 1024
PRESIGNED_URL_TTL_S = 300
# What a 503 for unavailable log storage tells the sender to wait.
STORAGE_RETRY_AFTER_S = 10
SUPPORTED_ENCODINGS = ("identity", "gzip", "x-gzip")


class _TooLargeError(Exception):
    """Raised from inside the reader so boto3 aborts the transfer; becomes PayloadTooLargeError."""


class _MalformedBodyError(Exception):
    """The gzip stream is corrupt; becomes a 400."""


class CountingReader:
    """A read-only file object over a request stream: optional gunzip, counts stored bytes, stops at the limit."""

    def __init__(self, raw: IO[bytes], *, max_bytes: int, gzip: bool, read_size: int = 64 * 1024) -> None:
        self._raw = raw
        self._max_bytes = max_bytes
        self._read_size = read_size
        self._decompressor: Any = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if gzip else None
        self._pending = b""  # decompressed bytes not handed out yet (at most one read_size chunk)
        self.count = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def _produce(self) -> bytes:
        """The next piece of stored bytes, or b"" at the end."""
        if self._decompressor is None:
            return self._raw.read(self._read_size)
        while True:
            decompressor = self._decompressor
            if decompressor.eof:
                # A gzip body may hold several members back to back (``cat a.gz b.gz``): start the next one.
                source = decompressor.unused_data or self._raw.read(self._read_size)
                if not source:
                    return b""
                decompressor = self._decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            else:
                source = decompressor.unconsumed_tail or self._raw.read(self._read_size)
                if not source:
                    raise _MalformedBodyError("truncated gzip stream")
            try:
                # Bounded output per call: a tiny compressed chunk cannot expand into gigabytes in memory.
                out: bytes = decompressor.decompress(source, self._read_size)
            except zlib.error as exc:
                raise _MalformedBodyError("corrupt gzip stream") from exc
            if out:
                return out

    def read(self, size: int = -1) -> bytes:
        chunks: list[bytes] = []
        have = 0
        if self._pending:
            chunks.append(self._pending)
            have = len(self._pending)
            self._pending = b""
        while size < 0 or have < size:
            piece = self._produce()
            if not piece:
                break
            self.count += len(piece)
            if self.count > self._max_bytes:
                raise _TooLargeError()
            chunks.append(piece)
            have += len(piece)
        data = b"".join(chunks)
        if size >= 0 and len(data) > size:
            data, self._pending = data[:size], data[size:]
        return data


@dataclass(frozen=True)
class StoredLog:
    """A log as the admin API lists it."""

    key: str
    sender: LogSender
    size: int
    uploaded_at: datetime
    url: str


def log_key(*, mandelbox_id: uuid.UUID, sender: LogSender, now: datetime) -> str:
    """``logs/YYYY/MM/DD/<mandelbox>/<sender>/<time>-<random>.log``: browsable by day, never colliding."""
    return f"logs/{now:%Y/%m/%d}/{mandelbox_id}/{sender.value}/{now:%H%M%S}-{uuid.uuid4().hex}.log"


def get_host_mandelbox_or_raise(session: Session, *, instance_name: str, mandelbox_id: uuid.UUID) -> Mandelbox:
    """A mandelbox placed on this host's instance, else 404 (no hint that it exists elsewhere)."""
    mandelbox = session.get(Mandelbox, mandelbox_id)
    if mandelbox is None or mandelbox.instance_name != instance_name:
        raise NotFoundError("No such mandelbox on this instance.")
    return mandelbox


def get_user_mandelbox_or_raise(session: Session, *, user_id: str, mandelbox_id: uuid.UUID) -> Mandelbox:
    """A mandelbox this user owns, else 404 (another user's id looks exactly like an unknown one)."""
    mandelbox = session.get(Mandelbox, mandelbox_id)
    if mandelbox is None or mandelbox.user_id != user_id:
        raise NotFoundError("No such mandelbox.")
    return mandelbox


def upload_host_log(
    session: Session, *, instance_name: str, mandelbox_id: uuid.UUID, upload: LogBody, s3: Any, bucket: str
) -> LogUpload:
    """Store a host's log for a mandelbox on its own instance; one unit of work.

    Raises:
        NotFoundError: no such mandelbox on this instance (nothing is read).
        PayloadTooLargeError, ValidationError, ServiceUnavailableError: see :func:`store_log`.
    """
    mandelbox = get_host_mandelbox_or_raise(session, instance_name=instance_name, mandelbox_id=mandelbox_id)
    return store_log(session, mandelbox=mandelbox, sender=LogSender.HOST, upload=upload, s3=s3, bucket=bucket)


def upload_client_log(
    session: Session, *, user_id: str, mandelbox_id: uuid.UUID, upload: LogBody, s3: Any, bucket: str
) -> LogUpload:
    """Store a client's log for a mandelbox its user owns; one unit of work.

    Raises:
        NotFoundError: not this user's mandelbox (nothing is read).
        PayloadTooLargeError, ValidationError, ServiceUnavailableError: see :func:`store_log`.
    """
    mandelbox = get_user_mandelbox_or_raise(session, user_id=user_id, mandelbox_id=mandelbox_id)
    return store_log(session, mandelbox=mandelbox, sender=LogSender.CLIENT, upload=upload, s3=s3, bucket=bucket)


@dataclass(frozen=True)
class LogBody:
    """An incoming log: how to open its byte stream (only once the caller is authorised), its encoding, its limit,
    and what one mandelbox may hold in all (``max_uploads`` logs, ``max_total_bytes`` stored bytes)."""

    open_stream: Callable[[], IO[bytes]]
    content_encoding: str | None
    max_bytes: int
    max_uploads: int = 1_000_000
    max_total_bytes: int = 2**62


class LogQuotaExceededError(RateLimitedError):
    """The mandelbox holds as many logs, or as many bytes of logs, as it may (429; no Retry-After: it won't reset)."""

    default_message = "This mandelbox's log quota is used up."


def _used_quota(session: Session, mandelbox_id: uuid.UUID) -> tuple[int, int]:
    """(logs stored, bytes stored) for one mandelbox: one indexed aggregate."""
    count, total = session.execute(
        select(func.count(), func.coalesce(func.sum(LogUpload.size), 0)).where(LogUpload.mandelbox_id == mandelbox_id)
    ).one()
    return int(count), int(total)


def store_log(
    session: Session, *, mandelbox: Mandelbox, sender: LogSender, upload: LogBody, s3: Any, bucket: str
) -> LogUpload:
    """Stream one log to S3 and index it, after the caller's authorisation read; commits.

    Returns:
        The new row.
    Raises:
        PayloadTooLargeError: more than ``upload.max_bytes`` would be stored (nothing is kept).
        ValidationError: an unsupported Content-Encoding or a corrupt gzip body (nothing is kept).
        ServiceUnavailableError: S3 failed (nothing is kept).
    """
    content_encoding, max_bytes = upload.content_encoding, upload.max_bytes
    encoding = (content_encoding or "identity").strip().lower()
    if encoding not in SUPPORTED_ENCODINGS:
        raise ValidationError(
            "Content-Encoding must be gzip or absent.", details={"headers": {"Content-Encoding": [encoding]}}
        )
    mandelbox_id = mandelbox.mandelbox_id
    # The quota is read before the upload and not locked through it (that would hold a transaction open for the
    # whole transfer): concurrent uploads to one mandelbox may overshoot it by at most their own sizes.
    uploads, stored = _used_quota(session, mandelbox_id)
    quota = {"max_uploads": upload.max_uploads, "max_total_bytes": upload.max_total_bytes}
    if uploads >= upload.max_uploads or stored >= upload.max_total_bytes:
        raise LogQuotaExceededError(details=quota)
    room = upload.max_total_bytes - stored
    limit = min(max_bytes, room)
    # The authorisation read is done: end its transaction so no snapshot stays open through a long upload.
    session.commit()

    now = utcnow()
    key = log_key(mandelbox_id=mandelbox_id, sender=sender, now=now)
    reader = CountingReader(upload.open_stream(), max_bytes=limit, gzip=encoding != "identity")
    # boto3 only when a log is stored: the public and host APIs serve this route but import the app without it
    # (botocore and s3transfer: ~11 MiB of every worker's memory).
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    transfer = TransferConfig(
        multipart_threshold=PART_SIZE_BYTES, multipart_chunksize=PART_SIZE_BYTES, use_threads=False
    )
    try:
        s3.upload_fileobj(
            reader,
            bucket,
            key,
            ExtraArgs={"ContentType": "text/plain; charset=utf-8"},
            Config=transfer,
        )
    except _TooLargeError as exc:
        if limit < max_bytes:  # it would fit one log, not what is left of the mandelbox's quota
            log.info("log_upload_refused", reason="quota", room=room, sender=sender.value)
            raise LogQuotaExceededError(details=quota) from exc
        log.info("log_upload_refused", reason="too_large", max_bytes=max_bytes, sender=sender.value)
        raise PayloadTooLargeError(f"A log may hold at most {max_bytes} bytes (after decompression).") from exc
    except _MalformedBodyError as exc:
        raise ValidationError(f"The body is not valid gzip ({exc}).") from exc
    except (ClientError, BotoCoreError) as exc:
        log.warning("log_upload_failed", error_type=type(exc).__name__, sender=sender.value)
        raise ServiceUnavailableError(
            "Log storage is unavailable right now; retry shortly.", retry_after_s=STORAGE_RETRY_AFTER_S
        ) from exc

    row = LogUpload(mandelbox_id=mandelbox_id, sender=sender, key=key, size=reader.count, uploaded_at=now)
    try:
        session.add(row)
        session.commit()
    except SQLAlchemyError:
        session.rollback()
        # No row means no object either: otherwise an unindexed log would sit in the bucket forever.
        _delete_quietly(s3, bucket, key)
        raise
    log.info("log_uploaded", key=key, size=reader.count, sender=sender.value)
    return row


def _delete_quietly(s3: Any, bucket: str, key: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3.delete_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as exc:
        log.error("log_orphan_not_deleted", key=key, error_type=type(exc).__name__)


def list_logs(
    session: Session, *, s3: Any, bucket: str, mandelbox_id: uuid.UUID, url_ttl_s: int = PRESIGNED_URL_TTL_S
) -> list[StoredLog]:
    """A mandelbox's logs, oldest first, each with a presigned download URL valid for ``url_ttl_s`` seconds.

    Raises:
        NotFoundError: no such mandelbox.
    """
    if session.get(Mandelbox, mandelbox_id) is None:
        raise NotFoundError("No such mandelbox.")
    uploads = session.scalars(
        select(LogUpload).where(LogUpload.mandelbox_id == mandelbox_id).order_by(LogUpload.uploaded_at, LogUpload.id)
    )
    return [
        StoredLog(
            key=upload.key,
            sender=upload.sender,
            size=upload.size,
            uploaded_at=upload.uploaded_at,
            # Presigning is local computation (no request to S3).
            url=s3.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": upload.key}, ExpiresIn=url_ttl_s
            ),
        )
        for upload in uploads
    ]
