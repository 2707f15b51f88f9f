"""Admin API: images, instances, mandelboxes (scope ``admin``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from apiflask import APIBlueprint

from fractal.admin import service
from fractal.admin.schemas import (
    ApiKeyCreatedOut,
    ApiKeyFilterIn,
    ApiKeyIn,
    ApiKeyListOut,
    ApiKeyOut,
    EventFilterIn,
    EventListOut,
    ImageFilterIn,
    ImageIn,
    ImageListOut,
    ImageOut,
    InstanceCreatedOut,
    InstanceFilterIn,
    InstanceIn,
    InstanceListOut,
    MandelboxFilterIn,
    validate_image_key,
)
from fractal.auth import api_keys
from fractal.auth.api_keys import ApiScope
from fractal.auth.decorators import admin_required
from fractal.events import list_events
from fractal.fleet.views import InstanceView, list_mandelbox_views
from fractal.images import ImageSpec, list_images, upsert_image
from fractal.models import Event, Image
from fractal.schemas import MandelboxListOut
from fractal.web import current_admin_actor, current_api_key_scopes, db_session, settings, state

admin_blueprint = APIBlueprint("admin", __name__, tag="Admin", url_prefix="/admin")
_AUTH = {401: "Unauthorized", 403: "Forbidden"}


def image_body(image: Image) -> dict[str, Any]:
    return {
        "region": image.region,
        "client_commit_hash": image.client_commit_hash,
        "ami_id": image.ami_id,
        "active": image.active,
        "instance_type": image.instance_type,
        "mandelbox_capacity": image.mandelbox_capacity,
        "target_free": image.target_free,
        "buffer_policy": image.buffer_policy,
        "created_at": image.created_at,
        "updated_at": image.updated_at,
    }


@admin_blueprint.get("/images")
@admin_required(ApiScope.ADMIN_READ)
@admin_blueprint.input(ImageFilterIn, location="query", arg_name="filters")
@admin_blueprint.output(ImageListOut)
@admin_blueprint.doc(
    summary="List images by region (paged)",
    description=(
        "Every image (region, client version, AMI, instance type, capacity per host, target free slots), ordered "
        "by region then creation; page with `limit` and `cursor`."
    ),
    security="UserToken",
    responses=_AUTH,
)
def get_images(filters: ImageFilterIn) -> Any:
    page = list_images(db_session(), limit=filters.limit, cursor=filters.cursor)
    return {"images": [image_body(image) for image in page.items], "next_cursor": page.next_cursor}


@admin_blueprint.put("/images/<region>/<client_commit_hash>")
@admin_required(ApiScope.IMAGES_WRITE)
@admin_blueprint.input(ImageIn, arg_name="body")
@admin_blueprint.output(ImageOut)
@admin_blueprint.doc(
    summary="Create or update an image",
    description=(
        "Upserts the image of (region, client_commit_hash). An active image makes the scaler keep `target_free` "
        "free slots (else the default) of that version in that region; deactivating it drains its hosts. The "
        "region name must be valid for the configured cloud (400 otherwise). Recorded in the audit log."
    ),
    security="UserToken",
    responses={**_AUTH, 400: "Validation error"},
)
def put_image(region: str, client_commit_hash: str, body: ImageIn) -> Any:
    validate_image_key(region, client_commit_hash, settings())
    image, _created = upsert_image(
        db_session(),
        region=region,
        client_commit_hash=client_commit_hash,
        spec=ImageSpec(**body.model_dump()),
        actor=current_admin_actor(),
        cache=state().cache,
    )
    return image_body(image)


@admin_blueprint.get("/instances")
@admin_required(ApiScope.ADMIN_READ)
@admin_blueprint.input(InstanceFilterIn, location="query", arg_name="filters")
@admin_blueprint.output(InstanceListOut)
@admin_blueprint.doc(
    summary="List instances with usage and last heartbeat, by region and name (paged)",
    description=(
        "Instances with status, live mandelboxes against capacity, address and last heartbeat; filter by `region`"
        " and `status`, page with `limit` and `cursor`."
    ),
    security="UserToken",
    responses=_AUTH,
)
def get_instances(filters: InstanceFilterIn) -> Any:
    page = service.list_instance_views(
        db_session(), region=filters.region, status=filters.status, limit=filters.limit, cursor=filters.cursor
    )
    return {"instances": page.items, "next_cursor": page.next_cursor}


@admin_blueprint.get("/mandelboxes")
@admin_required(ApiScope.ADMIN_READ)
@admin_blueprint.input(MandelboxFilterIn, location="query", arg_name="filters")
@admin_blueprint.output(MandelboxListOut)
@admin_blueprint.doc(
    summary="List mandelboxes, newest first (paged)",
    description=(
        "Mandelboxes with their user, host and status; filter by `user_id`, `status` or `instance_name`, page "
        "with `limit` and `cursor`."
    ),
    security="UserToken",
    responses=_AUTH,
)
def get_mandelboxes(filters: MandelboxFilterIn) -> Any:
    page = list_mandelbox_views(
        db_session(),
        user_id=filters.user_id,
        status=filters.status,
        instance_name=filters.instance_name,
        limit=filters.limit,
        cursor=filters.cursor,
    )
    return {"mandelboxes": page.items, "next_cursor": page.next_cursor}


@admin_blueprint.post("/instances")
@admin_required(ApiScope.ADMIN_WRITE)
@admin_blueprint.input(InstanceIn, arg_name="body")
@admin_blueprint.output(InstanceCreatedOut, status_code=201)
@admin_blueprint.doc(
    summary="Register a host by hand (answers its secret once)",
    description=(
        "Creates a PRE_CONNECTION instance for a host the scaler did not launch and answers its host secret, "
        "shown only here (stored as a digest). The host then shakes hands on the host API with that secret. A "
        "taken name is 409 `CONFLICT`."
    ),
    security="UserToken",
    responses={**_AUTH, 400: "Validation error", 409: "CONFLICT: the name is taken"},
)
def post_instance(body: InstanceIn) -> Any:
    registered = service.register_instance(db_session(), **body.model_dump(), actor=current_admin_actor())
    return asdict(registered)


@admin_blueprint.post("/instances/<instance_name>/drain")
@admin_blueprint.output(InstanceView)
@admin_blueprint.doc(
    summary="Drain an instance: no new assignments; terminated once empty",
    description=(
        "ACTIVE or PRE_CONNECTION becomes DRAINING (draining one already DRAINING answers it unchanged). Once the"
        " statement returns no assignment lands on the host; its live mandelboxes keep running and the scaler "
        "terminates it when it is empty. Other statuses are 409 `INVALID_TRANSITION`."
    ),
    security="UserToken",
    responses={**_AUTH, 404: "Not found", 409: "INVALID_TRANSITION"},
)
@admin_required(ApiScope.ADMIN_WRITE)
def drain_instance(instance_name: str) -> Any:
    view = service.drain_instance_view(db_session(), instance_name=instance_name, actor=current_admin_actor())
    return view


def event_body(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "created_at": event.created_at,
        "kind": event.kind,
        "actor": event.actor,
        "instance_name": event.instance_name,
        "mandelbox_id": event.mandelbox_id,
        "detail": event.detail,
    }


@admin_blueprint.get("/events")
@admin_required(ApiScope.ADMIN_READ)
@admin_blueprint.input(EventFilterIn, location="query", arg_name="filters")
@admin_blueprint.output(EventListOut)
@admin_blueprint.doc(
    summary="Audit events, newest first (paged)",
    description=(
        "The audit log: every status change, registration, image change and scaler decision with its actor and "
        "detail, newest first by id; page with `limit` and `cursor` (send the same `kind`, `since` and `until` "
        "filters with every page)."
    ),
    security="UserToken",
    responses=_AUTH,
)
def get_events(filters: EventFilterIn) -> Any:
    page = list_events(
        db_session(),
        limit=filters.limit,
        cursor=filters.cursor,
        kinds=filters.kinds,
        since=filters.since,
        until=filters.until,
    )
    return {"events": [event_body(event) for event in page.items], "next_cursor": page.next_cursor}


@admin_blueprint.post("/api-keys")
@admin_required(ApiScope.ADMIN_WRITE)
@admin_blueprint.input(ApiKeyIn, arg_name="body")
@admin_blueprint.output(ApiKeyCreatedOut, status_code=201)
@admin_blueprint.doc(
    summary="Create an API key (answered once)",
    description=(
        "Creates a key for automation with a name, scopes (`admin:read`, `admin:write`, `images:write`) and an "
        "optional expiry. The answer carries the key itself, once: only its digest is stored. A key cannot grant a "
        "scope its creator (an API key) does not hold: 403 `FORBIDDEN`."
    ),
    security="UserToken",
    responses={**_AUTH, 400: "Validation error"},
)
def post_api_key(body: ApiKeyIn) -> Any:
    created = api_keys.create_api_key(
        db_session(),
        name=body.name,
        scopes=body.scopes,
        expires_at=body.expires_at,
        actor=current_admin_actor(),
        caller_scopes=current_api_key_scopes(),
    )
    return {**asdict(created.view), "key": created.key}


@admin_blueprint.get("/api-keys")
@admin_required(ApiScope.ADMIN_READ)
@admin_blueprint.input(ApiKeyFilterIn, location="query", arg_name="filters")
@admin_blueprint.output(ApiKeyListOut)
@admin_blueprint.doc(
    summary="API keys by name (paged; revoked ones too)",
    description=(
        "Every key with its scopes, expiry, `last_used_at` (written at most once a minute) and `revoked_at`; never "
        "the key or its digest. Paged with `limit` and `cursor`."
    ),
    security="UserToken",
    responses=_AUTH,
)
def get_api_keys(filters: ApiKeyFilterIn) -> Any:
    page = api_keys.list_api_keys(db_session(), limit=filters.limit, cursor=filters.cursor)
    return {"api_keys": [asdict(view) for view in page.items], "next_cursor": page.next_cursor}


@admin_blueprint.delete("/api-keys/<key_id>")
@admin_required(ApiScope.ADMIN_WRITE)
@admin_blueprint.output(ApiKeyOut)
@admin_blueprint.doc(
    summary="Revoke an API key (at once; revoking again changes nothing)",
    description=(
        "The key is refused with 401 from the next request on, on every replica; the revocation is an audit "
        "event. An unknown id is 404 `NOT_FOUND`."
    ),
    security="UserToken",
    responses={**_AUTH, 404: "Not found"},
)
def delete_api_key(key_id: str) -> Any:
    return asdict(api_keys.revoke_api_key(db_session(), key_id=key_id, actor=current_admin_actor()))
