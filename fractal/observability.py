"""Structured JSON logs with a request id, and redaction of credentials."""

from __future__ import annotations

import contextvars
import logging
import random
import re
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, Protocol

import structlog
from flask import Flask, Request, Response, request

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_ENVIRON = "HTTP_X_REQUEST_ID"  # the incoming header, as WSGI names it
# Kept in the WSGI environ, a plain dict, rather than in flask.g (a context-local lookup per read and write).
REQUEST_ID_KEY = "fractal.request_id"
_STARTED_KEY = "fractal.request_started"
ACCESS_LOGGER = "fractal.access"
_access_log = structlog.get_logger(ACCESS_LOGGER)
_SENSITIVE_KEYS = re.compile(r"(authorization|token|secret|password|passwd|api[_-]?key|cookie)", re.IGNORECASE)
_BEARER = re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_API_KEY = re.compile(r"fk_[0-9a-f]{12}_[A-Za-z0-9_-]+")
_URL_PASSWORD = re.compile(r"(\w+://[^:/\s@]*:)[^@\s]+@")
REDACTED = "[REDACTED]"
# Probes and scrapes would drown the access log.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_NOT_SENSITIVE = frozenset({"request_id", "event"})
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")
# The version (4) and variant (RFC 4122) bits of a UUID4, as uuid.UUID(version=4) sets them.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (4 << 76) | (0x8000 << 48)
_random_bits = random.getrandbits


def new_request_id() -> str:
    """A random UUID4 as 32 hex digits: what ``uuid.uuid4().hex`` gives, without building a UUID object (which
    validates its arguments in Python: most of what a request id cost).

    The bits come from ``random`` (Mersenne Twister, seeded from the OS), not ``os.urandom``: a request id
    correlates log lines and answers, it guards nothing (a client may send its own), so it needs to be unique, not
    unpredictable, and ``getrandbits`` spares a system call on every request. ``random`` reseeds itself in every
    forked child (``os.register_at_fork``), so gunicorn's workers never draw the same sequence."""
    return "%032x" % ((_random_bits(128) & _UUID4_CLEAR) | _UUID4_SET)


def redact_text(value: str) -> str:
    """Strip bearer credentials, JWTs, API keys and URL passwords out of free text."""
    folded = value.lower()
    if "bearer" not in folded and "eyj" not in folded and "://" not in folded and "fk_" not in folded:
        return value  # the common case, every log line: nothing to look for, skip the four regexes
    value = _BEARER.sub("Bearer " + REDACTED, value)
    value = _JWT.sub(REDACTED, value)
    value = _API_KEY.sub(REDACTED, value)
    return _URL_PASSWORD.sub(r"\1" + REDACTED + "@", value)


def _redact_value(key: str, value: Any, depth: int = 0) -> Any:
    if _SENSITIVE_KEYS.search(key) and key not in _NOT_SENSITIVE:
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if depth > 4:  # deeper structures are not logged as-is; keep the processor cheap and bounded
        return value if isinstance(value, int | float | bool) or value is None else REDACTED
    if isinstance(value, Mapping):
        return {str(k): _redact_value(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_redact_value("", item, depth + 1) for item in value]
    return value


def redact_processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: secrets never reach a log line, whatever key, nested field or text they hide in."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact_value(key, value)
    return event_dict


def configure_logging(*, level: str = "INFO", json: bool = True) -> None:
    """Route structlog and stdlib logging through one JSON (or console) renderer on stderr."""
    global _access_line_writer
    stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        stamper,
        structlog.processors.format_exc_info,
        redact_processor,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    processors = [*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter]
    structlog.configure(
        processors=processors,
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processor=renderer)
    handler = LineHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("werkzeug", "botocore", "urllib3", "boto3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _access_line_writer = (
        AccessLineWriter(handler=handler, processors=processors, stamper=stamper, renderer=renderer) if json else None
    )


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler ``configure_logging`` installs; ``write_line`` writes an already rendered line."""

    def write_line(self, line: str) -> None:
        """Write ``line`` as ``emit`` writes a record's formatted text: under the handler's lock, then flushed;
        a failure reported by ``handleError`` as for any record."""
        self.acquire()
        try:
            self.stream.write(line + self.terminator)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": line, "name": ACCESS_LOGGER, "levelno": logging.INFO}))
        finally:
            self.release()


class AccessLineWriter:
    """The access line written straight to the JSON handler: the line structlog's chain would render, without the
    chain (BoundLogger, level and logger-name processors, ``wrap_for_formatter``, the stdlib record with its
    ``findCaller`` stack walk, ``ProcessorFormatter``'s record copy): about a tenth of a heartbeat's in-process CPU.

    It builds the same event dict in the same key order (the bound context, then the fields and event,
    then level, logger and timestamp), with the same timestamper, redaction and renderer objects, and writes it
    only while nothing else could see the record: the handler ``configure_logging`` installed is the root's only
    one with its formatter, no filter or handler sits between the access logger and the root, the level lets INFO
    through and structlog still runs the processors configured with it. Otherwise (a test's caplog, another
    handler, a structlog reconfigured) the line goes through structlog as before, so every handler gets it.
    (test/test_log_access_line.py checks both.)
    """

    def __init__(self, *, handler: LineHandler, processors: list[Any], stamper: Any, renderer: Any) -> None:
        self.handler = handler
        self.formatter = handler.formatter
        self.processors = processors
        self.stamper = stamper
        self.renderer = renderer
        self.logger = logging.getLogger(ACCESS_LOGGER)

    def can_write_directly(self) -> bool:
        logger: logging.Logger = self.logger
        handler = self.handler
        root = logging.root
        if logger.filters or not logger.isEnabledFor(logging.INFO):
            return False
        if handler.filters or handler.level > logging.INFO or handler.formatter is not self.formatter:
            return False
        handlers = root.handlers
        if len(handlers) != 1 or handlers[0] is not handler:
            return False
        step: Any = logger
        while step is not root:
            if step.handlers or not step.propagate:
                return False
            step = step.parent
        return structlog.get_config()["processors"] is self.processors

    def write(self, fields: dict[str, Any]) -> None:
        """``_access_log.info("request", **fields)``, as its JSON line."""
        if not self.can_write_directly():
            _access_log.info("request", **fields)
            return
        event = structlog.contextvars.merge_contextvars(None, "info", {**fields, "event": "request"})
        event["level"] = "info"
        event["logger"] = ACCESS_LOGGER
        self.stamper(None, "info", event)
        redact_processor(None, "info", event)
        self.handler.write_line(self.renderer(None, "info", event))


_access_line_writer: AccessLineWriter | None = None


def write_access_line(**fields: Any) -> None:
    """One access line (event "request") with ``fields``: straight to the JSON handler when that is the same line
    (``AccessLineWriter``), else through structlog."""
    writer = _access_line_writer
    if writer is None:
        _access_log.info("request", **fields)
    else:
        writer.write(fields)


class RequestObserver(Protocol):
    """What else the pipeline's hooks drive on every request (the request metrics)."""

    def start(self, current: Request, started: float) -> None: ...

    def finish(self, current: Request, status: int) -> None: ...

    def failed(self, current: Request) -> None: ...


def _log_context_vars(*keys: str) -> tuple[contextvars.ContextVar[Any], ...]:
    """The ContextVars structlog binds ``keys`` into (its ``bind_contextvars`` creates one per key, once, and its
    tokens name them: ``Token.var``), found by binding in a throwaway context, so no context is touched.

    The pipeline binds the request id, path and method through these, three ``ContextVar.set`` calls, instead of
    ``bind_contextvars`` (the key's name built, looked up and a token mapping returned, per key and request):
    ``merge_contextvars`` and ``clear_contextvars`` see the same variables either way."""
    tokens = contextvars.Context().run(structlog.contextvars.bind_contextvars, **dict.fromkeys(keys))
    return tuple(tokens[key].var for key in keys)


_REQUEST_ID_VAR, _PATH_VAR, _METHOD_VAR = _log_context_vars("request_id", "path", "method")
_LOG_KEY_PREFIX = structlog.contextvars.STRUCTLOG_KEY_PREFIX


def clear_log_context() -> None:
    """``structlog.contextvars.clear_contextvars``, skipping the variables already clear: every key any request
    of this thread ever bound stays in its context (as Ellipsis, structlog's "unbound"), and structlog's clear
    compares each one's name and sets it again on every request; here a variable holding a value is the only kind
    looked at twice. The outcome is the same: every structlog variable of the context unbound."""
    for var, value in contextvars.copy_context().items():
        if value is not Ellipsis and var.name.startswith(_LOG_KEY_PREFIX):
            var.set(Ellipsis)


# The proxy, typed loosely: its _get_current_object() (werkzeug's documented way to the object behind a
# proxy) is one lookup, where each ``request.x`` is one.
_request_proxy: Any = request


def register_request_context(
    app: Flask,
    *,
    observer: RequestObserver | None = None,
    guard: Callable[[Request], None] | None = None,
) -> None:
    """Give every request an id (honouring a sane incoming X-Request-ID) bound into every log line, write one
    access line per request, drive ``observer`` (the request metrics), and run ``guard`` (the path guards of
    ``request_guards``: it raises to refuse a request) once the request has its id and is counted, so a refused
    request gets its id, its metrics and its access line like any other.

    One before, one after and one teardown hook for all of it: Flask dispatches each hook on every request. The
    hooks fetch the request object once and keep their state in its WSGI environ. The id is sent back in
    ``X-Request-ID`` by the app's WSGI wrapper (``request_guards.CloseAfterPayloadTooLarge``, which
    ``create_app`` installs), from the environ.
    """

    @app.before_request
    def _start_request() -> None:
        current: Request = _request_proxy._get_current_object()
        environ = current.environ
        started = time.perf_counter()
        environ[_STARTED_KEY] = started
        incoming = environ.get(_REQUEST_ID_ENVIRON)
        request_id = incoming if incoming and _SANE_REQUEST_ID.fullmatch(incoming) else new_request_id()
        environ[REQUEST_ID_KEY] = request_id
        # The previous request's teardown cleared the context: binding is all a request needs
        # (structlog's own variables for these keys: _log_context_vars).
        _REQUEST_ID_VAR.set(request_id)
        _PATH_VAR.set(current.path)
        _METHOD_VAR.set(current.method)
        if observer is not None:
            observer.start(current, started)
        if guard is not None:
            guard(current)

    @app.after_request
    def _finish_request(response: Response) -> Response:
        current: Request = _request_proxy._get_current_object()
        if observer is not None:
            observer.finish(current, response.status_code)
        environ = current.environ
        # X-Request-ID is added to the answer's headers by the WSGI wrapper (request_guards.CloseAfterPayloadTooLarge).
        # One access line per request (gunicorn's access log is off): the bound context adds the request id
        # and, once authenticated, the user id or instance name. The query string is left out on purpose.
        if current.path not in _QUIET_PATHS:
            started = environ.get(_STARTED_KEY)
            write_access_line(
                status=response.status_code,
                duration_ms=round((time.perf_counter() - started) * 1000, 2) if started else None,
            )
        return response

    @app.teardown_request
    def _end_request(exc: BaseException | None) -> None:
        if exc is not None and observer is not None:
            observer.failed(_request_proxy._get_current_object())
        clear_log_context()
