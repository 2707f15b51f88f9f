"""The application factory: each root shell asks for the blueprints it serves."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import FunctionType, MethodType
from typing import Any, NoReturn

from apiflask import APIBlueprint, APIFlask
from apiflask import scaffold as apiflask_scaffold
from flask import Flask, Request, Response
from flask.sessions import NullSession, SessionInterface
from sqlalchemy import Engine
from werkzeug.middleware.proxy_fix import ProxyFix

from fractal.api_docs import configure_docs, error_code_schema, error_schema
from fractal.auth.tokens import build_verifier
from fractal.blueprints import OPERATOR_BLUEPRINT_NAMES
from fractal.cache import init_cache
from fractal.cloud import build_cloud_provider
from fractal.config import Settings, load_settings_or_exit
from fractal.database import SessionFactory, create_db_engine, create_session_factory
from fractal.errors import register_error_handlers
from fractal.health.service import check_readiness
from fractal.health.views import health_blueprint
from fractal.metrics import register_metrics
from fractal.nudge import build_nudge
from fractal.observability import configure_logging, register_request_context
from fractal.ratelimit import init_rate_limits
from fractal.redis_client import build_redis_client
from fractal.request_guards import install_request_guards, refuse_unservable_path
from fractal.web import EXTENSION_KEY, FractalState, close_db_session

SECURITY_SCHEMES = {
    "UserToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A user JWT (RS256). The admin API also takes an API key (fk_<id>_<secret>) holding the "
        "route's scope: admin:read for reads, images:write for PUT /admin/images/..., admin:write for other writes.",
    },
    "HostSecret": {
        "type": "http",
        "scheme": "bearer",
        "description": "The host secret issued at registration",
    },
}


def create_app(
    *,
    blueprints: Iterable[APIBlueprint],
    settings: Settings | None = None,
    session_factory: SessionFactory | None = None,
    title: str = "Fractal",
) -> APIFlask:
    """Build a Flask app serving ``blueprints`` plus health, error handling and request logging."""
    settings = settings or load_settings_or_exit()
    served = list(blueprints)
    app = FractalFlask(__name__, title=title, version="0.1.0", json_errors=True, docs_path="/docs")
    configure_app(app, settings)
    configure_logging(level=settings.log_level, json=settings.log_json)
    state = register_extensions(app, settings, session_factory)
    register_blueprints(app, [health_blueprint, *served])
    configure_docs(app)
    register_error_handlers(app)
    install_request_guards(app)
    # Only the operators' API serves /metrics on its own port (with the fleet gauges); see register_metrics.
    request_metrics = register_metrics(
        app,
        operator_facing=any(blueprint.name in OPERATOR_BLUEPRINT_NAMES for blueprint in served),
        readiness=lambda: readiness_checks(app),
        default_target_free=settings.target_free_mandelboxes,
    )
    register_request_context(app, observer=request_metrics, guard=refuse_unservable_path)
    app.teardown_appcontext(close_db_session)
    register_commands(app)
    register_spec_processor(app)
    app.extensions[EXTENSION_KEY] = state
    trust_proxies(app, settings.trusted_proxies)
    return app


def readiness_checks(app: APIFlask) -> dict[str, str]:
    """What /readyz checks, for the admin API's ``fractal_dependency_ready`` gauge (run at scrape time)."""
    current: FractalState = app.extensions[EXTENSION_KEY]
    return check_readiness(current.session_factory, redis_client=current.redis).checks


def trust_proxies(app: APIFlask, count: int) -> None:
    """Behind ``count`` reverse proxies, read the client's address and scheme from their X-Forwarded-* headers.

    Only the last ``count`` hops are believed, so a client-supplied X-Forwarded-For can neither dodge nor reset a
    per-address limit; with no proxy (0) the headers are ignored and the peer address is the client.
    """
    if count > 0:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=count, x_proto=count, x_host=count)  # type: ignore[method-assign]


def configure_app(app: APIFlask, settings: Settings) -> None:
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        VALIDATION_ERROR_STATUS_CODE=400,
        VALIDATION_ERROR_DESCRIPTION="Validation error",
        SECURITY_SCHEMES=SECURITY_SCHEMES,
        # The spec's server is the document's own origin, never the Host header of whoever asked first: APIFlask's
        # AUTO_SERVERS would write request.url_root into a spec every later reader gets ("Try it out" in /docs would
        # then send pasted tokens to the attacker's host).
        AUTO_SERVERS=False,
        SERVERS=[{"url": "/", "description": "this API, where this document was served from"}],
        JSON_SORT_KEYS=False,
        SECRET_KEY=settings.secret_key.get_secret_value(),
        TESTING=settings.env == "test",
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.session_interface = NoSessionInterface()


def _apiflask_sync_wrapper_code() -> Any:
    """The code of the wrapper APIFlask puts around a view its decorators (``doc``, ``input``, ``output``,
    ``auth_required``) touch: ``current_app.ensure_sync(f)(*args, **kwargs)``; None if this APIFlask has none."""
    wrap = getattr(apiflask_scaffold, "_ensure_sync", None)
    if not callable(wrap):
        return None

    def probe() -> None:
        return None

    wrapped = wrap(probe)
    return getattr(wrapped, "__code__", None) if wrapped is not probe else None


_APIFLASK_SYNC_WRAPPER_CODE = _apiflask_sync_wrapper_code()


class FractalFlask(APIFlask):
    """APIFlask, remembering ``ensure_sync``'s answer per function.

    Flask asks, on every call of every hook and view, whether the function is a coroutine function (inspect's
    flag check, about a microsecond each): ten times per /healthz request, an eighth of its in-process profile.
    A function's kind never changes, so the answer is kept; only plain functions and methods are remembered, so
    the cache is bounded by the code, not by the traffic.

    A view APIFlask wrapped (``_ensure_sync``: the wrapper looks ``current_app`` up and asks ``ensure_sync`` again
    on every call, to call the view) is answered with what that wrapper would call, the view made sync: the same
    function is called with the same arguments, without the wrapper's frame, proxy lookup and second question
    (``/healthz``'s view, and any route whose outermost decorator is APIFlask's).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync_callables: dict[Callable[..., Any], Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        try:
            return self._sync_callables[func]
        except KeyError:
            view = getattr(func, "__wrapped__", None) if _is_apiflask_sync_wrapper(func) else None
            sync = self.ensure_sync(view) if view is not None else super().ensure_sync(func)
            if isinstance(func, FunctionType | MethodType):
                self._sync_callables[func] = sync
            return sync
        except TypeError:  # unhashable: never remembered
            return super().ensure_sync(func)


def _is_apiflask_sync_wrapper(func: Callable[..., Any]) -> bool:
    return (
        _APIFLASK_SYNC_WRAPPER_CODE is not None
        and isinstance(func, FunctionType)
        and func.__code__ is _APIFLASK_SYNC_WRAPPER_CODE
        and callable(getattr(func, "__wrapped__", None))
    )


class NoSession(NullSession):
    """The empty, read-only session every request gets: reading answers nothing, writing fails loudly."""

    def _refuse(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise RuntimeError(
            "Fractal's APIs keep no Flask session: they authenticate every request by its token or host secret"
        )

    __setitem__ = __delitem__ = clear = pop = popitem = update = setdefault = _refuse


class NoSessionInterface(SessionInterface):
    """No Flask session: the APIs are token-authenticated JSON APIs, and nothing in them reads ``flask.session``
    (the fleet page keeps its credential in the browser's sessionStorage, not in a cookie). Flask's signed-cookie
    session parsed the request's cookies and looked for a session cookie on every request, and checked whether
    to write one back on every answer (about a tenth of a /healthz request's in-process time); with this, no
    cookie is read and none is ever set."""

    null_session_class = NoSession

    def __init__(self) -> None:
        # One for every request: it holds nothing and refuses every write, so there is nothing to keep apart, and
        # building one (a SecureCookieSession, its callback dict) was work on every request. Its ``accessed`` flag
        # may be set by a read; only save_session looks at it, and Flask never saves a null session.
        self._session = NoSession()

    def open_session(self, app: Flask, request: Request) -> NoSession:
        return self._session

    def save_session(self, app: Flask, session: Any, response: Response) -> None:
        return None  # never called: Flask skips saving a null session


def register_extensions(app: APIFlask, settings: Settings, session_factory: SessionFactory | None) -> FractalState:
    """Database sessions, token verifier, Redis client, cache, scaler nudge, rate limits; nothing connects here."""
    engine: Engine | None = None
    if session_factory is None:
        engine = create_db_engine(settings)
        session_factory = create_session_factory(engine)
    redis_client = build_redis_client(settings)
    state = FractalState(
        settings=settings,
        session_factory=session_factory,
        verifier=build_verifier(settings),
        cloud=build_cloud_provider(settings),
        cache=init_cache(app, settings, redis_client),
        nudge=build_nudge(settings),
        engine=engine,
        redis=redis_client,
    )
    init_rate_limits(app, settings, redis_client)
    return state


def register_blueprints(app: APIFlask, blueprints: Iterable[APIBlueprint]) -> None:
    for blueprint in blueprints:
        app.register_blueprint(blueprint)


def register_commands(app: APIFlask) -> None:
    from fractal.cli import register_cli

    register_cli(app)


def register_spec_processor(app: APIFlask) -> None:
    """Document the one error shape (its code an enum of every ErrorCode) on every 4xx/5xx answer and mark JSON
    request bodies as required."""

    @app.spec_processor
    def _document_errors(spec: dict[str, Any] | str) -> dict[str, Any] | str:
        if isinstance(spec, str):
            return spec
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas["Error"] = error_schema()
        schemas["ErrorCode"] = error_code_schema()
        error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for path_item in spec.get("paths", {}).values():
            for operation in path_item.values():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                if "requestBody" in operation:
                    operation["requestBody"]["required"] = True
                responses = operation["responses"]
                responses.setdefault("404", {"description": "Not found"})
                responses.setdefault("405", {"description": "Method not allowed"})
                responses.setdefault("500", {"description": "Internal error"})
                responses.setdefault("503", {"description": "A dependency is unavailable"})
                for status, response in responses.items():
                    if str(status)[0] in "45":
                        response["content"] = error_content
        return spec
