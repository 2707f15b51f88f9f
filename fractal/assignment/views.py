"""Public API: regions, assign, look up and delete a mandelbox."""

from __future__ import annotations

import re
from typing import Any

from apiflask import APIBlueprint
from flask import g, request

from fractal.assignment import service
from fractal.assignment.schemas import AssignIn, AssignOut, RegionsOut
from fractal.auth.decorators import user_required
from fractal.cache import CacheReader, ReadAhead
from fractal.config import Environment
from fractal.errors import ValidationError
from fractal.images import active_image_summary_read_ahead, enabled_regions
from fractal.metrics import count_assignments
from fractal.ratelimit import give_back_route_limit, user_limit
from fractal.schemas import MandelboxOut
from fractal.web import current_user, db_session, parse_mandelbox_id, settings, state

public_blueprint = APIBlueprint("public", __name__, tag="Mandelboxes")

_ERRORS = {401: "Unauthorized", 404: "Not found"}
IDEMPOTENCY_HEADER = "Idempotency-Key"
# At most 255 printable ASCII characters (what the idempotency_keys.key column holds).
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")


def idempotency_key_header() -> str | None:
    """The request's Idempotency-Key, None when absent; 400 when empty, too long or not printable ASCII."""
    raw = request.headers.get(IDEMPOTENCY_HEADER)
    if raw is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(raw):
        raise ValidationError(
            "The Idempotency-Key header must be 1 to 255 printable ASCII characters.",
            details={"headers": {IDEMPOTENCY_HEADER: ["1 to 255 printable ASCII characters"]}},
        )
    return raw


def _is_idempotent_replay() -> bool:
    """True when this assign carries an Idempotency-Key whose answer is stored: it will replay, not assign."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None or not _IDEMPOTENCY_KEY.fullmatch(key):
        return False
    return service.has_stored_answer(db_session(), user_id=current_user().user_id, idempotency_key=key)


def _read_images_ahead() -> ReadAhead | None:
    """The image summary's cache read, for the assign limit's Redis round trip to carry (one round trip for both);
    kept on ``g`` for the assign to read the summary through (:func:`_image_cache`)."""
    read = active_image_summary_read_ahead(state().cache)
    g.fractal_images_read_ahead = read
    return read


def _image_cache() -> CacheReader:
    """What this assign reads the image summary through: the read sent ahead, else the cache."""
    read: ReadAhead | None = g.get("fractal_images_read_ahead")
    return read if read is not None else state().cache


@public_blueprint.get("/regions")
@public_blueprint.output(RegionsOut)
@public_blueprint.doc(
    summary="Enabled regions",
    description=(
        "The regions a client may ask for, sorted: those with an active image. Cached briefly; an unknown region "
        "is simply not listed."
    ),
    security="UserToken",
    responses={401: "Unauthorized"},
)
@user_required
def list_regions() -> dict[str, Any]:
    return {"regions": enabled_regions(db_session(), cache=state().cache)}


@public_blueprint.post("/mandelbox/assign")
@user_required
@public_blueprint.input(AssignIn, arg_name="body")
@public_blueprint.output(AssignOut, status_code=201)
@public_blueprint.doc(
    summary="Assign a mandelbox",
    description=(
        "Picks the fullest ACTIVE instance with room that runs exactly `client_commit_hash`, trying the requested"
        " regions nearest first, and allocates a mandelbox there in one transaction. The client connects to `ip`;"
        " the mandelbox is released if the host does not claim it within the connect timeout. `Idempotency-Key` "
        "makes a retry answer exactly the first 201 (header `Idempotent-Replayed: true`). 503 "
        "`NO_INSTANCE_AVAILABLE` and 429 carry `Retry-After`."
    ),
    security="UserToken",
    responses={
        400: "Validation error",
        401: "Unauthorized",
        402: "Subscription required",
        409: "User already active / commit hash mismatch",
        422: "Region not enabled / Idempotency-Key reused with another body",
        429: "Rate limited",
        503: "No instance available",
    },
)
# Under user_required: counted per verified user, after authentication. Replays of a stored answer are exempt: the
# assign finds out in its own round trip (reading the stored answer is part of its one statement), so the count is
# taken first and given back for a replay; only a refusal asks the database first (a replay is never refused).
@user_limit(
    lambda: settings().assign_rate_limit,
    scope="assign",
    exempt_if_refused=lambda: _is_idempotent_replay(),
    read_ahead=_read_images_ahead,
)
@count_assignments
def assign(body: AssignIn) -> Any:
    config, app_state = settings(), state()
    result = service.assign_mandelbox(
        db_session(),
        user_id=current_user().user_id,
        regions=body.regions,
        client_commit_hash=body.client_commit_hash,
        session_id=body.session_id,
        max_per_user=config.max_mandelboxes_per_user,
        allow_local_dev=config.env is Environment.DEVELOPMENT,
        on_no_capacity=app_state.nudge.nudge,
        idempotency_key=idempotency_key_header(),
        idempotency_ttl_s=config.idempotency_ttl_s,
        cache=_image_cache(),
    )
    headers = {}
    if result.replayed:
        give_back_route_limit()
        headers["Idempotent-Replayed"] = "true"
    return result.assignment.to_body(), 201, headers


@public_blueprint.get("/mandelbox/<mandelbox_id>")
@public_blueprint.output(MandelboxOut)
@public_blueprint.doc(
    summary="The owner's view of a mandelbox",
    description=(
        "Status, region, host address and timestamps of one of the caller's mandelboxes. Another user's id is "
        "404, exactly like an unknown one."
    ),
    security="UserToken",
    responses=_ERRORS,
)
@user_required
def get_mandelbox(mandelbox_id: str) -> Any:
    view = service.get_mandelbox_for_user(
        db_session(), user_id=current_user().user_id, mandelbox_id=parse_mandelbox_id(mandelbox_id)
    )
    return view.model_dump()  # the owner's view: MandelboxOut leaves out user_id


@public_blueprint.delete("/mandelbox/<mandelbox_id>")
@public_blueprint.output(MandelboxOut, status_code=202)
@public_blueprint.doc(
    summary="End a mandelbox (becomes DYING)",
    description=(
        "Moves a live mandelbox of the caller's to DYING; its host is told to stop it in its next heartbeat "
        "answer and reports EXITED, which frees the slot. 202; ending an already ended one is not an error."
    ),
    security="UserToken",
    responses=_ERRORS,
)
@user_required
def delete_mandelbox(mandelbox_id: str) -> Any:
    view = service.delete_mandelbox_for_user(
        db_session(), user_id=current_user().user_id, mandelbox_id=parse_mandelbox_id(mandelbox_id)
    )
    return view.model_dump()  # the owner's view: MandelboxOut leaves out user_id
