"""Mandelbox exits shared by every domain: end rows, give their slots back, in a deadlock-free order."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from fractal.clock import utcnow
from fractal.models import EndReason, Instance, Mandelbox, MandelboxStatus


def exit_mandelboxes(
    session: Session,
    *,
    mandelbox_ids: Sequence[uuid.UUID] | None = None,
    instance_names: Sequence[str] | None = None,
    reason: EndReason,
    now: datetime | None = None,
) -> list[tuple[uuid.UUID, str]]:
    """Mark live mandelboxes EXITED and free their slots. Flushes only; the caller commits.

    Selects by ids, by instances, or both (intersection). An earlier ``end_reason`` (a user's delete) is kept.
    Returns the (mandelbox_id, instance_name) pairs that actually ended, so repeats are no-ops.
    """
    if mandelbox_ids is None and instance_names is None:
        raise ValueError("exit_mandelboxes needs mandelbox_ids or instance_names")
    now = now or utcnow()
    condition = Mandelbox.status != MandelboxStatus.EXITED
    if mandelbox_ids is not None:
        if not mandelbox_ids:
            return []
        condition = condition & Mandelbox.mandelbox_id.in_(list(mandelbox_ids))
    if instance_names is not None:
        if not instance_names:
            return []
        condition = condition & Mandelbox.instance_name.in_(list(instance_names))
    ended = session.execute(
        update(Mandelbox)
        .where(condition)
        .values(
            status=MandelboxStatus.EXITED,
            ended_at=now,
            status_changed_at=now,
            end_reason=func.coalesce(Mandelbox.end_reason, reason.value),
        )
        .returning(Mandelbox.mandelbox_id, Mandelbox.instance_name)
        .execution_options(synchronize_session=False)
    ).all()
    release_slots(session, Counter(name for _, name in ended), now=now)
    return [(row[0], row[1]) for row in ended]


def release_slots(session: Session, freed: Counter[str], *, now: datetime) -> None:
    """Give ``freed[name]`` slots back to each instance in two statements whatever their number.

    The rows are first locked in name order so two releasers can never deadlock.
    """
    names = sorted(name for name, count in freed.items() if count)
    if not names:
        return
    session.execute(
        select(Instance.instance_name)
        .where(Instance.instance_name.in_(names))
        .order_by(Instance.instance_name)
        .with_for_update(key_share=True)
    ).all()
    delta = case({name: freed[name] for name in names}, value=Instance.instance_name, else_=0)
    session.execute(
        update(Instance)
        .where(Instance.instance_name.in_(names))
        .values(
            live_mandelboxes=Instance.live_mandelboxes - delta,
            empty_since=case((Instance.live_mandelboxes - delta == 0, now), else_=Instance.empty_since),
        )
        .execution_options(synchronize_session=False)
    )


def live_count_for_user(session: Session, user_id: str) -> int:
    return int(
        session.execute(
            select(func.count())
            .select_from(Mandelbox)
            .where(Mandelbox.user_id == user_id, Mandelbox.status != MandelboxStatus.EXITED)
        ).scalar_one()
    )
