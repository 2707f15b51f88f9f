"""Images (one per region and client version) and the regions they enable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fractal.cache import CacheReader, DataCache, ReadAhead
from fractal.clock import utcnow
from fractal.events import EventKind, record_event
from fractal.models import Image
from fractal.pagination import Page, SortKey, after_key, decode_cursor, fetch_page


@dataclass(frozen=True)
class ImageSpec:
    ami_id: str
    active: bool
    instance_type: str
    mandelbox_capacity: int
    target_free: int | None = None
    buffer_policy: dict[str, Any] | None = None  # fractal.scaling.policy.BufferPolicy as JSON; None: static


IMAGES_LIST = "images"
# By region, then in the order the images were created (ids are handed out in that order and are unique).
IMAGE_ORDER = (SortKey(Image.region), SortKey(Image.id))


def list_images(session: Session, *, limit: int = 500, cursor: str | None = None) -> Page[Image]:
    """One page of images by region, oldest first within a region.

    Raises:
        ValidationError: ``cursor`` is not a cursor of this list.
    """
    query = select(Image)
    if cursor is not None:
        key = decode_cursor(cursor, list_name=IMAGES_LIST, key_types=(str, int))
        query = query.where(after_key(IMAGE_ORDER, key))
    return fetch_page(
        session,
        query,
        keys=IMAGE_ORDER,
        limit=limit,
        list_name=IMAGES_LIST,
        convert=lambda row: row[0],
        key_of=lambda image: (image.region, image.id),
    )


# Cache namespace of everything derived from the images table; bumped whenever an image changes.
IMAGES_CACHE_NAMESPACE = "images"
ACTIVE_SUMMARY = "active"


def active_image_summary(session: Session, *, cache: CacheReader | None = None) -> dict[str, Any]:
    """What every assign and /regions read: ``{"regions": [...], "newest": {region: commit}}``.

    Served from ``cache`` (plain data, short TTL, invalidated by :func:`upsert_image`) when one is given.
    """
    if cache is None:
        return _load_active_image_summary(session)
    return cache.get_or_load(IMAGES_CACHE_NAMESPACE, ACTIVE_SUMMARY, lambda: _load_active_image_summary(session))


def active_image_summary_read_ahead(cache: DataCache) -> ReadAhead | None:
    """The cache read of :func:`active_image_summary`, for another command's round trip to carry (the assign's
    rate limit); pass what it returns as the ``cache`` the summary is then read through."""
    return cache.read_ahead(IMAGES_CACHE_NAMESPACE, ACTIVE_SUMMARY)


def _load_active_image_summary(session: Session) -> dict[str, Any]:
    rows = session.execute(
        select(Image.region, Image.client_commit_hash)
        .where(Image.active)
        .order_by(Image.region, Image.created_at.desc(), Image.id.desc())
    ).all()
    newest: dict[str, str] = {}
    for region, commit in rows:
        newest.setdefault(region, commit)
    return {"regions": sorted(newest), "newest": newest}


def enabled_regions(session: Session, *, cache: DataCache | None = None) -> list[str]:
    """Regions with at least one active image, sorted."""
    return list(active_image_summary(session, cache=cache)["regions"])


def newest_active_commits(session: Session, *, cache: DataCache | None = None) -> dict[str, str]:
    """region → client_commit_hash of its newest active image (the `local_dev` override)."""
    return dict(active_image_summary(session, cache=cache)["newest"])


def upsert_image(
    session: Session,
    *,
    region: str,
    client_commit_hash: str,
    spec: ImageSpec,
    actor: str,
    cache: DataCache | None = None,
) -> tuple[Image, bool]:
    """Create or update the image for (region, client_commit_hash); returns (image, created).

    Two first-time upserts of one key race on the unique constraint; the loser retries as an update.
    After the commit, the cached image summary is invalidated for every replica sharing ``cache``.
    """
    try:
        result = _upsert_image_once(
            session, region=region, client_commit_hash=client_commit_hash, spec=spec, actor=actor
        )
    except IntegrityError:
        session.rollback()
        result = _upsert_image_once(
            session, region=region, client_commit_hash=client_commit_hash, spec=spec, actor=actor
        )
    if cache is not None:
        cache.invalidate(IMAGES_CACHE_NAMESPACE)
    return result


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
    image.buffer_policy = spec.buffer_policy
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
        "buffer_policy": image.buffer_policy,
    }
