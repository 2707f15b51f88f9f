"""Host-service API: handshake, heartbeats and mandelbox status reports (host secret auth)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from apiflask import APIBlueprint
from flask import current_app, request

from fractal.auth.decorators import (
    current_host_instance_name,
    current_host_secret_digest,
    host_claimed,
    host_required,
)
from fractal.host_service import service
from fractal.host_service.schemas import (
    MAX_HEARTBEAT_BYTES,
    HandshakeIn,
    HandshakeOut,
    HeartbeatIn,
    HeartbeatOut,
    HeartbeatReport,
    HostMandelboxOut,
    MandelboxStatusIn,
    accept_heartbeat,
)
from fractal.ratelimit import limit_failed_handshakes
from fractal.web import db_engine_or_session, db_session, parse_mandelbox_id, settings

host_blueprint = APIBlueprint("host", __name__, tag="Host service", url_prefix="/host")
_AUTH = {401: "Unauthorized (no hint whether the instance exists)"}


@host_blueprint.post("/handshake")
@limit_failed_handshakes
@host_required
@host_blueprint.input(HandshakeIn, arg_name="body")
@host_blueprint.output(HandshakeOut)
@host_blueprint.doc(
    summary="A host announces itself (PRE_CONNECTION becomes ACTIVE)",
    description=(
        "The host presents its secret with its name, address, client version and capacity. PRE_CONNECTION becomes"
        " ACTIVE; a restarted ACTIVE or DRAINING host keeps its status. A different client version is 409 "
        "`HOST_MISMATCH`, a LOST or TERMINATING host 409 `INVALID_TRANSITION`; repeated failed handshakes are "
        "rate limited (429)."
    ),
    security="HostSecret",
    responses={**_AUTH, 400: "Validation error", 409: "HOST_MISMATCH or INVALID_TRANSITION", 429: "Rate limited"},
)
def handshake(body: HandshakeIn) -> Any:
    result = service.handshake_host(
        db_session(),
        authenticated_instance=current_host_instance_name(),
        instance_name=body.instance_name,
        ip=body.ip,
        client_commit_hash=body.client_commit_hash,
        mandelbox_capacity=body.mandelbox_capacity,
        heartbeat_interval_s=settings().heartbeat_interval_s,
    )
    return asdict(result)


def _heartbeat_input(view: Callable[..., Any]) -> Callable[..., Any]:
    """``@host_blueprint.input(HeartbeatIn)`` (its OpenAPI body, its answers to bad bodies), except that the body
    every host sends is accepted by ``accept_heartbeat`` without the model (a third of the route's own CPU); the
    view gets a HeartbeatReport either way."""

    def through_model(*args: Any, body: HeartbeatIn, **kwargs: Any) -> Any:
        return view(*args, body=HeartbeatReport.of(body), **kwargs)

    validated = host_blueprint.input(HeartbeatIn, arg_name="body")(functools.wraps(view)(through_model))

    @functools.wraps(validated)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Heartbeats are frequent and small: a large body is refused before it is read (413 PAYLOAD_TOO_LARGE).
        # Set here, before the first read of the body, rather than in a blueprint hook that every host request
        # would dispatch.
        request.max_content_length = MAX_HEARTBEAT_BYTES
        # silent: a body that is not JSON is left to the model's path, which answers it as before (400).
        report = accept_heartbeat(request.get_json(force=True, silent=True))
        if report is None:
            return validated(*args, **kwargs)
        return view(*args, body=report, **kwargs)

    return wrapper


@host_blueprint.post("/heartbeat")
@host_claimed
@_heartbeat_input
@host_blueprint.output(HeartbeatOut)
@host_blueprint.doc(
    summary="A host is alive; answers its status and which mandelboxes to stop",
    description=(
        "Records the heartbeat (its own table, never locking instance rows) with the host's mandelboxes and "
        "metrics, and answers the host's status (DRAINING: take no new work, shut down when empty), the heartbeat"
        " interval and the mandelboxes users ended."
    ),
    security="HostSecret",
    responses={**_AUTH, 400: "Validation error", 413: "Body too large"},
)
def heartbeat(body: HeartbeatReport) -> Any:
    answer = service.record_heartbeat(
        db_engine_or_session(),  # no ORM session on this, the hottest route
        authenticated_instance=current_host_instance_name(),
        instance_name=body.instance_name,
        mandelboxes=body.mandelboxes,
        metrics=body.metrics,
        heartbeat_interval_s=settings().heartbeat_interval_s,
        secret_digest=current_host_secret_digest(),
    )
    # HeartbeatOut's shape, serialised here: a Response passes APIFlask's output unchanged (the model's
    # serialisation of these three fields cost more than building them).
    return current_app.json.response(
        {
            "status": str(answer.status),
            "heartbeat_interval_s": answer.heartbeat_interval_s,
            "stop_mandelboxes": [str(mandelbox_id) for mandelbox_id in answer.stop_mandelboxes],
        }
    )


@host_blueprint.get("/mandelboxes/<mandelbox_id>")
@host_blueprint.output(HostMandelboxOut)
@host_blueprint.doc(
    summary="Check a connecting client's mandelbox (404 unless it is on this instance)",
    description=(
        "Lets the host verify a connecting client: the mandelbox's user, session and status, only for mandelboxes"
        " on the calling host."
    ),
    security="HostSecret",
    responses={**_AUTH, 404: "Not found"},
)
@host_required
def get_mandelbox(mandelbox_id: str) -> Any:
    view = service.get_mandelbox_for_host(
        db_session(), instance_name=current_host_instance_name(), mandelbox_id=parse_mandelbox_id(mandelbox_id)
    )
    return asdict(view)


@host_blueprint.put("/mandelboxes/<mandelbox_id>")
@host_required
@host_blueprint.input(MandelboxStatusIn, arg_name="body")
@host_blueprint.output(HostMandelboxOut)
@host_blueprint.doc(
    summary="Report a mandelbox's status (EXITED frees its slot)",
    description=(
        "Moves one of the host's mandelboxes along its lifecycle (ALLOCATED → CONNECTING → RUNNING → DYING → "
        "EXITED, EXITED from any live status); repeating the current status is a no-op, anything else 409 "
        "`INVALID_TRANSITION`. EXITED frees the slot at once."
    ),
    security="HostSecret",
    responses={**_AUTH, 400: "Validation error", 404: "Not found", 409: "INVALID_TRANSITION"},
)
def put_mandelbox(mandelbox_id: str, body: MandelboxStatusIn) -> Any:
    view = service.report_mandelbox_status(
        db_session(),
        instance_name=current_host_instance_name(),
        mandelbox_id=parse_mandelbox_id(mandelbox_id),
        status=body.status,
    )
    return asdict(view)
