"""`/healthz` (no I/O) and `/readyz` (database and Redis reachable)."""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint

from fractal.health.service import check_readiness
from fractal.request_guards import install_request_guards
from fractal.web import state

health_blueprint = APIBlueprint("health", __name__, tag="Health")
# Every app serves this blueprint (create_app always adds it), so it is where every app gets its request guards.
# TODO(lead): call install_request_guards(app) in factory.create_app instead and drop this hook.
health_blueprint.record_once(lambda setup: install_request_guards(setup.app))


@health_blueprint.get("/healthz")
@health_blueprint.doc(summary="Process is alive (no I/O)")
def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@health_blueprint.get("/readyz")
@health_blueprint.doc(summary="Database and Redis reachable", responses={200: "ready", 503: "a dependency is down"})
def readyz() -> tuple[dict[str, Any], int]:
    app_state = state()
    report = check_readiness(app_state.session_factory, redis_client=app_state.redis)
    return report.to_body(), 200 if report.ready else 503
