"""Which blueprints each API serves. The root shells and the tests both build apps from these lists.

Each list is built on first use and imports only the views it serves (module ``__getattr__``): the public API's
workers never import the admin, scaling, mail or fleet-page views and what only they use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apiflask import APIBlueprint

    PUBLIC_BLUEPRINTS: tuple[APIBlueprint, ...]
    ADMIN_BLUEPRINTS: tuple[APIBlueprint, ...]
    HOST_BLUEPRINTS: tuple[APIBlueprint, ...]
    OPERATOR_BLUEPRINTS: frozenset[APIBlueprint]
    BLUEPRINTS_BY_API: dict[str, tuple[APIBlueprint, ...]]

# (module, blueprint) of each API's blueprints, in the order they are registered.
_SERVED: dict[str, tuple[tuple[str, str], ...]] = {
    "public": (
        ("fractal.assignment.views", "public_blueprint"),
        ("fractal.log_uploads.views", "public_logs_blueprint"),
        ("fractal.newsletter.views", "newsletter_blueprint"),
    ),
    "admin": (
        ("fractal.admin.views", "admin_blueprint"),
        ("fractal.scaling.views", "scaling_blueprint"),
        ("fractal.mail.views", "mail_admin_blueprint"),
        ("fractal.log_uploads.views", "admin_logs_blueprint"),
        ("fractal.ui.views", "ui_blueprint"),  # the fleet page at /ui/ (static, out of the spec): operators only
    ),
    "host": (
        ("fractal.host_service.views", "host_blueprint"),
        ("fractal.log_uploads.views", "host_logs_blueprint"),
    ),
}
_LISTS = {"PUBLIC_BLUEPRINTS": "public", "ADMIN_BLUEPRINTS": "admin", "HOST_BLUEPRINTS": "host"}
# An app serving any of these (by blueprint name) is the operators' (not reachable by users or hosts): it serves
# /metrics on its port.
OPERATOR_BLUEPRINT_NAMES: frozenset[str] = frozenset({"admin"})

# Each API's OpenAPI title, so three specs side by side (and their /docs pages) say which API they describe.
API_TITLES: dict[str, str] = {
    "public": "Fractal public API",
    "admin": "Fractal admin API",
    "host": "Fractal host-service API",
}


def blueprints_of(api: str) -> tuple[APIBlueprint, ...]:
    """The blueprints ``api`` (``public``, ``admin`` or ``host``) serves, importing only their views."""
    return tuple(getattr(import_module(module), name) for module, name in _SERVED[api])


def __getattr__(name: str) -> Any:
    if name in _LISTS:
        value: Any = blueprints_of(_LISTS[name])
    elif name == "BLUEPRINTS_BY_API":
        value = {api: blueprints_of(api) for api in _SERVED}
    elif name == "OPERATOR_BLUEPRINTS":
        value = frozenset(bp for bp in blueprints_of("admin") if bp.name in OPERATOR_BLUEPRINT_NAMES)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # built once
    return value
