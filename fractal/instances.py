"""Instance rows and their operator-driven lifecycle: registration (with a host secret) and drain.

Shared by the admin API (hand registration, drain) and the scaler (launches, spare drains).
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fractal.auth.hosts import generate_host_secret, hash_host_secret
from fractal.clock import utcnow
from fractal.errors import ConflictError, InvalidTransitionError, NotFoundError
from fractal.events import EventKind, record_event
from fractal.models import Instance, InstanceStatus

DRAINABLE_STATUSES = (InstanceStatus.ACTIVE, InstanceStatus.PRE_CONNECTION)


def create_instance_record(
    session: Session,
    *,
    instance_name: str,
    region: str,
    client_commit_hash: str,
    ami_id: str,
    instance_type: str,
    mandelbox_capacity: int,
    status: InstanceStatus = InstanceStatus.PRE_CONNECTION,
    cloud_provider_id: str | None = None,
    actor: str,
    event_kind: EventKind | str = EventKind.INSTANCE_REGISTERED,
) -> tuple[Instance, str]:
    """Insert an instance with a fresh host secret and record an event. Flushes only; the caller commits.

    Returns:
        The new row and the plaintext host secret (shown once; only its hash is stored).

    Raises:
        ConflictError: the name or the cloud provider id is already taken (the caller's transaction survives).
    """
    secret = generate_host_secret()
    now = utcnow()
    instance = Instance(
        instance_name=instance_name,
        region=region,
        client_commit_hash=client_commit_hash,
        ami_id=ami_id,
        instance_type=instance_type,
        mandelbox_capacity=mandelbox_capacity,
        live_mandelboxes=0,
        status=status,
        cloud_provider_id=cloud_provider_id,
        host_secret_hash=hash_host_secret(secret),
        created_at=now,
        status_changed_at=now,
        empty_since=now,
    )
    # A savepoint keeps the caller's transaction usable when the unique constraints refuse the row.
    try:
        with session.begin_nested():
            session.add(instance)
    except IntegrityError as exc:
        raise ConflictError(
            "An instance with this name or cloud provider id already exists.",
            details={"instance_name": instance_name},
        ) from exc
    record_event(
        session,
        kind=event_kind,
        actor=actor,
        instance_name=instance_name,
        detail={
            "region": region,
            "client_commit_hash": client_commit_hash,
            "ami_id": ami_id,
            "instance_type": instance_type,
            "mandelbox_capacity": mandelbox_capacity,
            "status": str(status),
            "cloud_provider_id": cloud_provider_id,
        },
    )
    session.flush()
    return instance, secret


def get_instance(session: Session, *, instance_name: str) -> Instance | None:
    return session.get(Instance, instance_name)


def get_instance_or_raise(session: Session, *, instance_name: str) -> Instance:
    """The instance row, or NotFoundError."""
    instance = get_instance(session, instance_name=instance_name)
    if instance is None:
        raise NotFoundError("No such instance.")
    return instance


def drain_instance(session: Session, *, instance_name: str, actor: str) -> Instance:
    """Move an ACTIVE or PRE_CONNECTION instance to DRAINING so it takes no new mandelboxes. Commits.

    Draining a DRAINING instance again changes nothing. Once this returns, no later assignment lands on it.

    Raises:
        NotFoundError: no such instance.
        InvalidTransitionError: the instance is TERMINATING, TERMINATED or LOST.
    """
    now = utcnow()
    # A plain UPDATE (not a read then a write): it waits for the row lock that an in-flight assign holds
    # (FOR NO KEY UPDATE) and re-checks the status on the newest row version. So every assign that could see
    # the instance ACTIVE has committed before the drain returns, and every later one sees DRAINING.
    drained = session.execute(
        update(Instance)
        .where(Instance.instance_name == instance_name, Instance.status.in_(DRAINABLE_STATUSES))
        .values(status=InstanceStatus.DRAINING, status_changed_at=now)
        .returning(Instance.live_mandelboxes)
        .execution_options(synchronize_session=False)
    ).first()
    if drained is not None:
        record_event(
            session,
            kind=EventKind.INSTANCE_DRAINED,
            actor=actor,
            instance_name=instance_name,
            detail={"live_mandelboxes": drained.live_mandelboxes},
        )
        session.commit()
        return get_instance_or_raise_fresh(session, instance_name=instance_name)

    status = session.execute(
        select(Instance.status).where(Instance.instance_name == instance_name)
    ).scalar_one_or_none()
    session.rollback()
    if status is None:
        raise NotFoundError("No such instance.")
    if status is InstanceStatus.DRAINING:
        return get_instance_or_raise_fresh(session, instance_name=instance_name)
    raise InvalidTransitionError(
        f"A {status} instance cannot be drained.", details={"instance_name": instance_name, "status": str(status)}
    )


def get_instance_or_raise_fresh(session: Session, *, instance_name: str) -> Instance:
    """The instance as the database has it now (bypassing the session's identity map)."""
    instance = session.execute(
        select(Instance).where(Instance.instance_name == instance_name).execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if instance is None:
        raise NotFoundError("No such instance.")
    return instance


__all__ = [
    "DRAINABLE_STATUSES",
    "create_instance_record",
    "drain_instance",
    "get_instance",
    "get_instance_or_raise",
    "get_instance_or_raise_fresh",
]
