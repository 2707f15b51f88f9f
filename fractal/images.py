"""Images (one per region and client version) and the regions they enable."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fractal.events import EventKind, record_event
from fractal.lifecycle import utcnow
from fractal.models import Image


@dataclass(frozen=True)
class ImageSpec:
    ami_id: str
    active: bool
    instance_type: str
    mandelbox_capacity: int
    target_free: int | None = None


def list_images(session: Session) -> list[Image]:
    return list(session.scalars(select(Image).order_by(Image.region, Image.created_at, Image.id)))


def enabled_regions(session: Session) -> list[str]:
    """Regions with at least one active image, sorted."""
    return list(session.scalars(select(Image.region).where(Image.active).distinct().order_by(Image.region)))


def newest_active_commits(session: Session) -> dict[str, str]:
    """region → client_commit_hash of its newest active image (the `local_dev` override)."""
    rows = session.execute(
        select(Image.region, Image.client_commit_hash)
        .where(Image.active)
        .order_by(Image.region, Image.created_at.desc(), Image.id.desc())
    ).all()
    newest: dict[str, str] = {}
    for region, commit in rows:
        newest.setdefault(region, commit)
    return newest


def upsert_image(
    session: Session, *, region: str, client_commit_hash: str, spec: ImageSpec, actor: str
) -> tuple[Image, bool]:
    """Create or update the image for (region, client_commit_hash); returns (image, created).

    Two first-time upserts of one key race on the unique constraint; the loser retries as an update.
    """
    try:
        return _upsert_image_once(session, region=region, client_commit_hash=client_commit_hash, spec=spec, actor=actor)
    except IntegrityError:
        session.rollback()
        return _upsert_image_once(session, region=region, client_commit_hash=client_commit_hash, spec=spec, actor=actor)


def _upsert_image_once(
    session: Session, *, region: str, client_commit_hash: str, spec: ImageSpec, actor: str
) -> tuple[Image, bool]:
    image = session.execute(
        select(Image).where(Image.region == region, Image.client_commit_hash == client_commit_hash).with_for_update()
    ).scalar_one_or_none()
    created = image is None
    if image is None:
        image = Image(region=region, client_commit_hash=client_commit_hash)
        session.add(image)
    before = None if created else _image_fields(image)
    image.ami_id = spec.ami_id
    image.active = spec.active
    image.instance_type = spec.instance_type
    image.mandelbox_capacity = spec.mandelbox_capacity
    image.target_free = spec.target_free
    image.updated_at = utcnow()
    session.flush()
    record_event(
        session,
        kind=EventKind.IMAGE_CHANGED,
        actor=actor,
        detail={
            "region": region,
            "client_commit_hash": client_commit_hash,
            "created": created,
            "before": before,
            "after": _image_fields(image),
        },
    )
    session.commit()
    return image, created


def _image_fields(image: Image) -> dict[str, object]:
    return {
        "ami_id": image.ami_id,
        "active": image.active,
        "instance_type": image.instance_type,
        "mandelbox_capacity": image.mandelbox_capacity,
        "target_free": image.target_free,
    }
