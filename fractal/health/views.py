"""`/healthz` (no I/O) and `/readyz` (database and Redis reachable)."""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint

from fractal.health.service import check_readiness
from fractal.web import state

health_blueprint = APIBlueprint("health", __name__, tag="Health")


@health_blueprint.get("/healthz")
@health_blueprint.doc(
    summary="Process is alive (no I/O)",
    description=(
        'Liveness: answers 200 `{"status": "ok"}` without touching the database or Redis, so a slow dependency '
        "never gets a healthy process restarted."
    ),
)
def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@health_blueprint.get("/readyz")
@health_blueprint.doc(
    summary="Database and Redis reachable",
    description=(
        "Readiness: pings the database and, when configured, Redis. 200 with `checks` when every dependency "
        "answers; 503 `SERVICE_UNAVAILABLE` naming the failing ones otherwise (a load balancer stops sending "
        "traffic until it recovers)."
    ),
    responses={200: "ready", 503: "a dependency is down"},
)
def readyz() -> tuple[dict[str, Any], int]:
    app_state = state()
    report = check_readiness(app_state.session_factory, redis_client=app_state.redis)
    return report.to_body(), 200 if report.ready else 503
