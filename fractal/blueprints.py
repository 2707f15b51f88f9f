"""Which blueprints each API serves. The root shells and the tests both build apps from these lists."""

from __future__ import annotations

from apiflask import APIBlueprint

from fractal.admin.views import admin_blueprint
from fractal.assignment.views import public_blueprint
from fractal.host_service.views import host_blueprint
from fractal.log_uploads.views import admin_logs_blueprint, host_logs_blueprint, public_logs_blueprint
from fractal.mail.views import mail_admin_blueprint
from fractal.newsletter.views import newsletter_blueprint
from fractal.scaling.views import scaling_blueprint
from fractal.ui.views import ui_blueprint

PUBLIC_BLUEPRINTS: tuple[APIBlueprint, ...] = (public_blueprint, public_logs_blueprint, newsletter_blueprint)
ADMIN_BLUEPRINTS: tuple[APIBlueprint, ...] = (
    admin_blueprint,
    scaling_blueprint,
    mail_admin_blueprint,
    admin_logs_blueprint,
    ui_blueprint,  # the fleet page at /ui/ (static, out of the spec): the operators' app only
)
HOST_BLUEPRINTS: tuple[APIBlueprint, ...] = (host_blueprint, host_logs_blueprint)
# An app serving any of these is the operators' (not reachable by users or hosts): it serves /metrics on its port.
OPERATOR_BLUEPRINTS: frozenset[APIBlueprint] = frozenset({admin_blueprint})

BLUEPRINTS_BY_API: dict[str, tuple[APIBlueprint, ...]] = {
    "public": PUBLIC_BLUEPRINTS,
    "admin": ADMIN_BLUEPRINTS,
    "host": HOST_BLUEPRINTS,
}

# Each API's OpenAPI title, so three specs side by side (and their /docs pages) say which API they describe.
API_TITLES: dict[str, str] = {
    "public": "Fractal public API",
    "admin": "Fractal admin API",
    "host": "Fractal host-service API",
}
