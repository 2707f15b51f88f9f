"""Log uploads: a host for its own mandelboxes, a user for their own, and the admin listing with download URLs."""

from __future__ import annotations

from dataclasses import asdict
from typing import IO, Any

from apiflask import APIBlueprint
from flask import g, request

from fractal.auth.api_keys import ApiScope
from fractal.auth.decorators import admin_required, current_host_instance_name, host_required, user_required
from fractal.log_uploads import service
from fractal.log_uploads.schemas import LogListOut, LogStoredOut
from fractal.ratelimit import route_limit
from fractal.web import current_user, db_session, parse_mandelbox_id, settings, state

host_logs_blueprint = APIBlueprint("host_logs", __name__, tag="Host", url_prefix="/host")
public_logs_blueprint = APIBlueprint("public_logs", __name__, tag="Logs")
admin_logs_blueprint = APIBlueprint("admin_logs", __name__, tag="Logs", url_prefix="/admin")

_UPLOAD_RESPONSES = {
    400: "Unsupported Content-Encoding or corrupt gzip",
    401: "Unauthorized",
    404: "Not found",
    413: "Log too large",
    429: "Too many uploads from this sender, or the mandelbox's log quota is used up",
    503: "Log storage unavailable",
}


def s3_client() -> Any:
    """This app's S3 client, built on first use (honours AWS_ENDPOINT_URL_S3)."""
    app_state = state()
    if app_state.s3 is None:
        import boto3
        from botocore.config import Config

        # SigV4 presigned URLs: SigV2 ones are refused by S3 in every region opened since 2014.
        app_state.s3 = boto3.client("s3", config=Config(signature_version="s3v4"))
    return app_state.s3


def request_log_body() -> service.LogBody:
    """This request's body as a log upload, limited by FRACTAL_MAX_LOG_BYTES rather than the JSON limit."""
    config = settings()
    max_bytes = config.max_log_bytes

    def open_stream() -> IO[bytes]:
        # The app-wide MAX_CONTENT_LENGTH (1 MiB) is for JSON; a log route gets its own limit, per request, so
        # werkzeug answers 413 to a larger Content-Length before a byte is read. One byte more than the limit:
        # on a body without Content-Length (chunked, wsgi.input_terminated under gunicorn) werkzeug raises 413 on
        # the read that *reaches* its limit, so a log of exactly FRACTAL_MAX_LOG_BYTES would be refused; the
        # reader counts the stored bytes and enforces the inclusive limit itself.
        request.max_content_length = max_bytes + 1
        return request.stream

    return service.LogBody(
        open_stream=open_stream,
        content_encoding=request.headers.get("Content-Encoding"),
        max_bytes=max_bytes,
        max_uploads=config.log_uploads_per_mandelbox,
        max_total_bytes=config.log_bytes_per_mandelbox,
    )


def _sender_key() -> str:
    """Rate-limit key: the authenticated host instance or user (the decorator runs after authentication)."""
    name = g.get("host_instance_name")
    if name is not None:
        return f"host:{name}"
    return f"user:{current_user().user_id}"


# Per sender across all its mandelboxes: a host or a user spraying uploads is refused 429 with Retry-After.
log_upload_limit = route_limit(lambda: settings().log_upload_rate_limit, key_func=_sender_key, scope="log-uploads")


@host_logs_blueprint.put("/mandelboxes/<mandelbox_id>/logs")
@host_logs_blueprint.output(LogStoredOut, status_code=201)
@host_logs_blueprint.doc(
    summary="Upload a mandelbox's protocol log (host)",
    description=(
        "The host's protocol log for one of its own mandelboxes (raw body, optionally gzip), stored in the log "
        "bucket; answers the object key and size."
    ),
    security="HostSecret",
    responses=_UPLOAD_RESPONSES,
)
@host_required
@log_upload_limit
def put_host_log(mandelbox_id: str) -> Any:
    stored = service.upload_host_log(
        db_session(),
        instance_name=current_host_instance_name(),
        mandelbox_id=parse_mandelbox_id(mandelbox_id),
        upload=request_log_body(),
        s3=s3_client(),
        bucket=settings().logs_bucket,
    )
    return {"key": stored.key, "size": stored.size}


@public_logs_blueprint.put("/mandelbox/<mandelbox_id>/logs")
@public_logs_blueprint.output(LogStoredOut, status_code=201)
@public_logs_blueprint.doc(
    summary="Upload the client's log for your mandelbox",
    description=(
        "The raw request body (optionally gzip-encoded) is stored in the log bucket for the caller's mandelbox; "
        "answers the object key and size. Bodies above the upload limit are 413."
    ),
    security="UserToken",
    responses=_UPLOAD_RESPONSES,
)
@user_required
@log_upload_limit
def put_client_log(mandelbox_id: str) -> Any:
    stored = service.upload_client_log(
        db_session(),
        user_id=current_user().user_id,
        mandelbox_id=parse_mandelbox_id(mandelbox_id),
        upload=request_log_body(),
        s3=s3_client(),
        bucket=settings().logs_bucket,
    )
    return {"key": stored.key, "size": stored.size}


@admin_logs_blueprint.get("/mandelboxes/<mandelbox_id>/logs")
@admin_logs_blueprint.output(LogListOut)
@admin_logs_blueprint.doc(
    summary="A mandelbox's logs with short-lived download URLs",
    description=(
        "The client and host logs uploaded for a mandelbox, each with a presigned download URL valid for 5 minutes."
    ),
    security="UserToken",
    responses={401: "Unauthorized", 403: "Forbidden", 404: "Not found"},
)
@admin_required(ApiScope.ADMIN_READ)
def get_logs(mandelbox_id: str) -> Any:
    logs = service.list_logs(
        db_session(), s3=s3_client(), bucket=settings().logs_bucket, mandelbox_id=parse_mandelbox_id(mandelbox_id)
    )
    return {"logs": [asdict(entry) for entry in logs]}
