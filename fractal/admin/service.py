"""Operator views of the fleet."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from fractal.clock import database_now
from fractal.errors import NotFoundError
from fractal.events import EventKind
from fractal.fleet.instances import NewInstance, create_instance, drain_instance
from fractal.fleet.views import InstanceView, instance_view_query
from fractal.models import Image, Instance, InstanceStatus
from fractal.pagination import Page, SortKey, after_key, decode_cursor, fetch_page

MANUAL_PLACEHOLDER = "manual"


INSTANCES_LIST = "instances"
INSTANCE_ORDER = (SortKey(Instance.region), SortKey(Instance.instance_name))


def list_instance_views(
    session: Session,
    *,
    region: str | None = None,
    status: InstanceStatus | None = None,
    limit: int = 500,
    cursor: str | None = None,
) -> Page[InstanceView]:
    """One page of instances with live usage and last heartbeat, by region then name.

    Raises:
        ValidationError: ``cursor`` is not a cursor of this list.
    """
    query = instance_view_query()
    if region is not None:
        query = query.where(Instance.region == region)
    if status is not None:
        query = query.where(Instance.status == status)
    if cursor is not None:
        key = decode_cursor(cursor, list_name=INSTANCES_LIST, key_types=(str, str))
        query = query.where(after_key(INSTANCE_ORDER, key))
    return fetch_page(
        session,
        query,
        keys=INSTANCE_ORDER,
        limit=limit,
        list_name=INSTANCES_LIST,
        convert=InstanceView.from_row,
        key_of=lambda view: (view.region, view.instance_name),
    )


def get_instance_view(session: Session, *, instance_name: str) -> InstanceView | None:
    row = session.execute(instance_view_query().where(Instance.instance_name == instance_name)).first()
    return InstanceView.from_row(row) if row is not None else None


def get_instance_view_or_raise(session: Session, *, instance_name: str) -> InstanceView:
    view = get_instance_view(session, instance_name=instance_name)
    if view is None:
        raise NotFoundError("No such instance.")
    return view


@dataclass(frozen=True)
class RegisteredInstance:
    instance_name: str
    status: InstanceStatus
    host_secret: str


def register_instance(
    session: Session,
    *,
    instance_name: str,
    region: str,
    client_commit_hash: str,
    mandelbox_capacity: int,
    ami_id: str | None,
    instance_type: str | None,
    cloud_provider_id: str | None,
    actor: str,
) -> RegisteredInstance:
    """An operator registers a host by hand: a PRE_CONNECTION row and its secret (answered once). Commits.

    Missing ``ami_id``/``instance_type`` come from the image of (region, commit), else ``manual``.

    Raises:
        ConflictError: the name (or cloud provider id) is taken.
    """
    image = session.execute(
        select(Image.ami_id, Image.instance_type).where(
            Image.region == region, Image.client_commit_hash == client_commit_hash
        )
    ).first()
    instance, secret = create_instance(
        session,
        new=NewInstance(
            instance_name=instance_name,
            region=region,
            client_commit_hash=client_commit_hash,
            ami_id=ami_id or (image.ami_id if image else MANUAL_PLACEHOLDER),
            instance_type=instance_type or (image.instance_type if image else MANUAL_PLACEHOLDER),
            mandelbox_capacity=mandelbox_capacity,
            cloud_provider_id=cloud_provider_id,
        ),
        actor=actor,
        now=database_now(session),  # the boot timeout is measured from here, on the database's clock
        event_kind=EventKind.INSTANCE_REGISTERED,
    )
    status = instance.status
    session.commit()
    return RegisteredInstance(instance_name=instance_name, status=status, host_secret=secret)


def drain_instance_view(session: Session, *, instance_name: str, actor: str) -> InstanceView:
    """Drain an instance (see ``fractal.fleet.instances.drain_instance``) and answer the admin view of it.

    Raises:
        NotFoundError, InvalidTransitionError.
    """
    drain_instance(session, instance_name=instance_name, actor=actor)
    return get_instance_view_or_raise(session, instance_name=instance_name)
