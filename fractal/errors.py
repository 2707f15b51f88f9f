"""Domain errors and the one place they become HTTP answers.

Every failure any Fractal API returns has the body ``{"error": CODE, "message": text, "details"?: ...}``.
Services raise :class:`FractalError` subclasses; :func:`register_error_handlers` maps them, Flask/Werkzeug's
own HTTP errors, request-validation errors and database outages to that shape, and turns anything unexpected
into a logged 500 that reveals nothing about internals.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, cast

import structlog
from apiflask import APIFlask
from apiflask.exceptions import HTTPError
from flask import Response, jsonify
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

log = structlog.get_logger(__name__)


class ErrorCode(enum.StrEnum):
    """Machine-readable error codes; clients branch on these, never on messages."""

    VALIDATION_ERROR = "VALIDATION_ERROR"
    UNAUTHORIZED = "UNAUTHORIZED"
    PAYMENT_REQUIRED = "PAYMENT_REQUIRED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    USER_ALREADY_ACTIVE = "USER_ALREADY_ACTIVE"
    COMMIT_HASH_MISMATCH = "COMMIT_HASH_MISMATCH"
    HOST_MISMATCH = "HOST_MISMATCH"
    INVALID_TRANSITION = "INVALID_TRANSITION"
    CONFLICT = "CONFLICT"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    REGION_NOT_ENABLED = "REGION_NOT_ENABLED"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    INVALID_TOKEN = "INVALID_TOKEN"  # noqa: S105 (an error code, not a credential)
    RATE_LIMITED = "RATE_LIMITED"
    NO_INSTANCE_AVAILABLE = "NO_INSTANCE_AVAILABLE"
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
    DATABASE_BUSY = "DATABASE_BUSY"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    # Refused by the HTTP server before the app (gunicorn's limits), in the same JSON shape.
    URI_TOO_LONG = "URI_TOO_LONG"
    HEADERS_TOO_LARGE = "HEADERS_TOO_LARGE"


@dataclass(frozen=True)
class ErrorCodeDoc:
    """What one code means to a client: the HTTP statuses it comes with and what to do about it."""

    statuses: tuple[int, ...]
    meaning: str


# The documentation of every code: the specs' ErrorCode schema and docs/errors.md are built from this
# (``python -m fractal.api_docs``); test/test_api_docs.py checks it covers every code and every status in use.
ERROR_CODE_DOCS: dict[ErrorCode, ErrorCodeDoc] = {
    ErrorCode.VALIDATION_ERROR: ErrorCodeDoc(
        (400, 415, 417, 422, 501),
        "The request is malformed or a field is invalid; `details` names the fields. 422 when it is well formed "
        "but cannot be processed (an unknown mail template, missing arguments). Fix the request; do not retry it "
        "as is.",
    ),
    ErrorCode.UNAUTHORIZED: ErrorCodeDoc(
        (401,), "Missing, malformed, expired or wrongly signed credentials (user token, admin token or host secret)."
    ),
    ErrorCode.PAYMENT_REQUIRED: ErrorCodeDoc((402,), "The user has no active subscription; assignment is refused."),
    ErrorCode.FORBIDDEN: ErrorCodeDoc(
        (403,), "The credentials are valid but may not do this (a user token on the admin API, a narrower scope)."
    ),
    ErrorCode.NOT_FOUND: ErrorCodeDoc(
        (404,), "No such route or resource, or one the caller may not see (another user's mandelbox)."
    ),
    ErrorCode.METHOD_NOT_ALLOWED: ErrorCodeDoc((405,), "The route exists but not with this HTTP method."),
    ErrorCode.USER_ALREADY_ACTIVE: ErrorCodeDoc(
        (409,), "The user already holds the maximum number of live mandelboxes; end one first."
    ),
    ErrorCode.COMMIT_HASH_MISMATCH: ErrorCodeDoc(
        (409,),
        "Instances with room exist in the requested regions, but none runs this client version: update the client.",
    ),
    ErrorCode.HOST_MISMATCH: ErrorCodeDoc(
        (409,), "A handshake's client version differs from the one the instance was registered with."
    ),
    ErrorCode.INVALID_TRANSITION: ErrorCodeDoc(
        (409,),
        "The status change is not allowed from the current status (draining a TERMINATED host, a host reporting "
        "RUNNING for an EXITED mandelbox); `details` says the current status where it helps.",
    ),
    ErrorCode.CONFLICT: ErrorCodeDoc((409,), "The request conflicts with what exists (a host name already taken)."),
    ErrorCode.PAYLOAD_TOO_LARGE: ErrorCodeDoc(
        (413,), "The body is over the limit for this route; the connection is closed after the answer."
    ),
    ErrorCode.REGION_NOT_ENABLED: ErrorCodeDoc(
        (422,), "None of the requested regions has an active image (`GET /regions` lists the enabled ones)."
    ),
    ErrorCode.IDEMPOTENCY_KEY_REUSED: ErrorCodeDoc(
        (422,), "This Idempotency-Key was used before with a different request body; use a new key."
    ),
    ErrorCode.INVALID_TOKEN: ErrorCodeDoc(
        (400,), "A signed link token (newsletter confirmation or unsubscription) is invalid, tampered or expired."
    ),
    ErrorCode.RATE_LIMITED: ErrorCodeDoc(
        (429,), "Too many requests from this user, address or host; retry after the `Retry-After` seconds."
    ),
    ErrorCode.NO_INSTANCE_AVAILABLE: ErrorCodeDoc(
        (503,),
        "No instance with room runs this client version in the requested regions right now; the scaler has been "
        "nudged. Retry after the `Retry-After` seconds.",
    ),
    ErrorCode.DATABASE_UNAVAILABLE: ErrorCodeDoc(
        (503,), "The database cannot be reached; nothing was stored. Retry after the `Retry-After` seconds."
    ),
    ErrorCode.DATABASE_BUSY: ErrorCodeDoc(
        (503,),
        "A lock or statement timeout, a deadlock, a serialization failure or an exhausted connection pool: the "
        "transaction was rolled back and nothing was stored. Retry after the `Retry-After` seconds.",
    ),
    ErrorCode.SERVICE_UNAVAILABLE: ErrorCodeDoc(
        (503,), "A dependency (the mail backend, object storage, a readiness check) is unavailable; retry later."
    ),
    ErrorCode.INTERNAL_ERROR: ErrorCodeDoc(
        (500,), "An unexpected failure; it is logged with the request id, and the answer reveals nothing else."
    ),
    ErrorCode.URI_TOO_LONG: ErrorCodeDoc(
        (414,), "The request line (path and query) is over the HTTP server's limit; refused before the app."
    ),
    ErrorCode.HEADERS_TOO_LARGE: ErrorCodeDoc(
        (431,), "A request header is over the HTTP server's limit; refused before the app."
    ),
}


class FractalError(Exception):
    """Base of every expected failure. Subclasses fix ``status`` and ``code``."""

    status: int = 500
    code: ErrorCode = ErrorCode.INTERNAL_ERROR
    default_message: str = "Internal error."

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Any = None,
        retry_after_s: int | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = details
        self.retry_after_s = retry_after_s
        super().__init__(self.message)

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": str(self.code), "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return body


class ValidationError(FractalError):
    status, code, default_message = 400, ErrorCode.VALIDATION_ERROR, "The request is not valid."


class UnprocessableError(FractalError):
    """Well-formed but semantically refused input (422 VALIDATION_ERROR), e.g. an unknown mail template."""

    status, code, default_message = 422, ErrorCode.VALIDATION_ERROR, "The request cannot be processed."


class UnauthorizedError(FractalError):
    status, code, default_message = 401, ErrorCode.UNAUTHORIZED, "Missing or invalid credentials."


class PaymentRequiredError(FractalError):
    status, code, default_message = 402, ErrorCode.PAYMENT_REQUIRED, "An active subscription is required."


class ForbiddenError(FractalError):
    status, code, default_message = 403, ErrorCode.FORBIDDEN, "You may not do this."


class NotFoundError(FractalError):
    status, code, default_message = 404, ErrorCode.NOT_FOUND, "Not found."


class UserAlreadyActiveError(FractalError):
    status, code = 409, ErrorCode.USER_ALREADY_ACTIVE
    default_message = "You already hold the maximum number of live mandelboxes."


class CommitHashMismatchError(FractalError):
    status, code = 409, ErrorCode.COMMIT_HASH_MISMATCH
    default_message = "Instances with room exist, but none runs this client version."


class HostMismatchError(FractalError):
    status, code, default_message = 409, ErrorCode.HOST_MISMATCH, "The host does not match its registration."


class InvalidTransitionError(FractalError):
    status, code, default_message = 409, ErrorCode.INVALID_TRANSITION, "That state change is not allowed."


class ConflictError(FractalError):
    status, code, default_message = 409, ErrorCode.CONFLICT, "The request conflicts with the current state."


class PayloadTooLargeError(FractalError):
    status, code, default_message = 413, ErrorCode.PAYLOAD_TOO_LARGE, "The request body is too large."


class RegionNotEnabledError(FractalError):
    status, code, default_message = (
        422,
        ErrorCode.REGION_NOT_ENABLED,
        "None of the requested regions is enabled.",
    )


class IdempotencyKeyReusedError(FractalError):
    status, code = 422, ErrorCode.IDEMPOTENCY_KEY_REUSED
    default_message = "This Idempotency-Key was already used with a different request."


class InvalidTokenError(FractalError):
    status, code, default_message = 400, ErrorCode.INVALID_TOKEN, "The token is invalid or expired."


class RateLimitedError(FractalError):
    status, code, default_message = 429, ErrorCode.RATE_LIMITED, "Too many requests; slow down."


class NoInstanceAvailableError(FractalError):
    status, code = 503, ErrorCode.NO_INSTANCE_AVAILABLE
    default_message = "No instance has room right now; retry shortly."


class DatabaseUnavailableError(FractalError):
    status, code = 503, ErrorCode.DATABASE_UNAVAILABLE
    default_message = "The database cannot be reached right now; retry shortly."


class DatabaseBusyError(FractalError):
    status, code = 503, ErrorCode.DATABASE_BUSY
    default_message = "The database is busy (a lock or time bound was hit); retry shortly."


class ServiceUnavailableError(FractalError):
    status, code, default_message = 503, ErrorCode.SERVICE_UNAVAILABLE, "A dependency is unavailable."


# Werkzeug HTTP errors (404 from routing, 405, 413 from MAX_CONTENT_LENGTH, 400 from bad JSON) → our codes.
_HTTP_STATUS_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.VALIDATION_ERROR,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.VALIDATION_ERROR,
    422: ErrorCode.VALIDATION_ERROR,
    429: ErrorCode.RATE_LIMITED,
}

_HTTP_MESSAGES: dict[int, str] = {
    400: "The request is malformed.",
    404: "Not found.",
    405: "This method is not allowed here.",
    413: "The request body is too large.",
    415: "Unsupported media type.",
}

# Connection-level failures: the database is down or restarting. Anything else from the DB is a bug.
_DB_OUTAGE_MARKERS = (
    "could not connect",
    "connection refused",
    "server closed the connection",
    "terminating connection",
    "connection to server",
    "the database system is",
    "ssl connection has been closed",
    "connection already closed",
    "no connection to the server",
)


# SQLSTATEs that mean "the database was busy or is going away; the same request may well succeed on a retry".
# The transaction they ended was rolled back, so nothing of the request was stored.
_DB_BUSY_SQLSTATES = frozenset(
    {
        "55P03",  # lock_not_available: lock_timeout (FRACTAL_DB_LOCK_TIMEOUT_MS) or NOWAIT
        "57014",  # query_canceled: statement_timeout (FRACTAL_DB_STATEMENT_TIMEOUT_MS) or pg_cancel_backend
        "40P01",  # deadlock_detected
        "40001",  # serialization_failure
        # The connection-ending ones (admin_shutdown from pg_terminate_backend or a shutting-down server, the idle
        # timeout) when they arrive with their SQLSTATE; libpq often reports them only as "server closed the
        # connection unexpectedly", which is an outage (DATABASE_UNAVAILABLE) like any other lost connection.
        "57P01",
        "25P03",
    }
)


def sqlstate(exc: BaseException) -> str | None:
    """The Postgres SQLSTATE behind a SQLAlchemy error, when there is one."""
    code = getattr(getattr(exc, "orig", None), "pgcode", None)
    return code if isinstance(code, str) else None


def is_database_busy(exc: BaseException) -> bool:
    """True when a SQLAlchemy error is a lock or statement timeout, a deadlock, a serialization failure or a
    cancelled/terminated query, or this process's connection pool stayed exhausted past its timeout: the database
    is up, this request lost, a retry may succeed."""
    if isinstance(exc, PoolTimeoutError):
        return True
    return isinstance(exc, DBAPIError) and sqlstate(exc) in _DB_BUSY_SQLSTATES


def is_database_outage(exc: BaseException) -> bool:
    """True when a SQLAlchemy error means the database is unreachable rather than that our SQL is wrong."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        text = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
        return any(marker in text for marker in _DB_OUTAGE_MARKERS)
    return False


def error_response(error: FractalError) -> Response:
    """The JSON response for a domain error (status, body, Retry-After)."""
    response = jsonify(error.to_body())
    response.status_code = error.status
    if error.retry_after_s is not None:
        response.headers["Retry-After"] = str(max(1, int(error.retry_after_s)))
    return response


def register_error_handlers(app: APIFlask) -> None:
    """Map every failure to the one JSON error shape."""

    @app.errorhandler(FractalError)
    def _domain_error(error: FractalError) -> Response:
        return error_response(error)

    # APIFlask routes Werkzeug's HTTP exceptions (routing 404, 405, 413, malformed JSON 400) and its own
    # request-validation errors through this one processor as HTTPError instances.
    @app.error_processor
    def _http_error(error: HTTPError) -> Response:
        status = error.status_code
        if status >= 500:
            return _internal_error(error)
        code = _HTTP_STATUS_CODES.get(status, ErrorCode.VALIDATION_ERROR)
        details = error.detail or None
        if details is not None:
            message = "The request is not valid: " + _describe_fields(details)
        else:
            message = _HTTP_MESSAGES.get(status, str(error.message or "Request failed."))
        response = error_response(_as_fractal(status, code, message, details))
        response.headers.extend(error.headers or {})
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        if isinstance(error, HTTPException):  # raised outside APIFlask's processor path
            return cast(Response, _http_error(HTTPError(error.code or 500, message=error.description or "")))
        if is_database_busy(error):
            log.warning("database_busy", error_type=type(error).__name__, sqlstate=sqlstate(error))
            return error_response(DatabaseBusyError(retry_after_s=1))
        if is_database_outage(error):
            log.warning("database_unavailable", error_type=type(error).__name__)
            return error_response(DatabaseUnavailableError(retry_after_s=2))
        return _internal_error(error)


def _describe_fields(details: Any) -> str:
    """Name the offending fields in the human message: ``json.regions: List should have at most 20 items``."""
    parts: list[str] = []
    if isinstance(details, dict):
        for location, fields in details.items():
            if isinstance(fields, dict):
                for field, messages in fields.items():
                    text = "; ".join(messages) if isinstance(messages, list) else str(messages)
                    parts.append(f"{field}: {text}" if field != "_schema" else text)
            else:
                parts.append(f"{location}: {fields}")
    return ", ".join(parts) or "invalid input"


def _internal_error(error: BaseException) -> Response:
    log.exception("unhandled_exception", error_type=type(error).__name__, exc_info=error)
    response = jsonify({"error": str(ErrorCode.INTERNAL_ERROR), "message": "Internal error."})
    response.status_code = 500
    return response


def _as_fractal(status: int, code: ErrorCode, message: str, details: Any) -> FractalError:
    error = FractalError(message, details=details)
    error.status = status
    error.code = code
    return error
