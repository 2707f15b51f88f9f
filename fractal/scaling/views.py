"""Admin API for the scaler: run a pass now, see capacity per (region, version)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from apiflask import APIBlueprint

from fractal.auth.api_keys import ApiScope
from fractal.auth.decorators import admin_required
from fractal.metrics import observe_reconcile
from fractal.scaling.capacity import list_capacity
from fractal.scaling.reconcile import reconcile_fleet
from fractal.scaling.schemas import CapacityListOut, ReconcileOut
from fractal.web import db_session, settings, state

scaling_blueprint = APIBlueprint("scaling", __name__, tag="Scaling", url_prefix="/admin")
_AUTH = {401: "Unauthorized", 403: "Forbidden"}


@scaling_blueprint.post("/scaling/reconcile")
@scaling_blueprint.output(ReconcileOut)
@scaling_blueprint.doc(
    summary="Run one scaler pass now",
    description="Returns the actions taken; `ran` is false when another scaler held the lock.",
    security="UserToken",
    responses=_AUTH,
)
@admin_required(ApiScope.ADMIN_WRITE)
def post_reconcile() -> Any:
    report = reconcile_fleet(state().session_factory, settings=settings(), cloud=state().cloud)
    observe_reconcile(report)
    return report.as_dict()


@scaling_blueprint.get("/capacity")
@scaling_blueprint.output(CapacityListOut)
@scaling_blueprint.doc(summary="Capacity per region and client version", security="UserToken", responses=_AUTH)
@admin_required(ApiScope.ADMIN_READ)
def get_capacity() -> Any:
    rows = list_capacity(db_session(), default_target_free=settings().target_free_mandelboxes)
    return {"capacity": [asdict(row) for row in rows]}
