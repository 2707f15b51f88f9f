"""Mandelbox assignment: the one place capacity is handed to users.

Correctness rests on Postgres, not on the application: the chosen instance row is locked while its live
count is raised, a CHECK constraint makes ``live_mandelboxes > mandelbox_capacity`` impossible, and a
per-user advisory lock serialises one user's concurrent assigns so the per-user limit holds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Delete, Insert, bindparam, delete, insert, select, text, tuple_
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningDelete

from fractal.cache import CacheReader
from fractal.clock import db_now
from fractal.database import advisory_key, advisory_xact_lock, is_postgres
from fractal.errors import (
    CommitHashMismatchError,
    FractalError,
    IdempotencyKeyReusedError,
    NoInstanceAvailableError,
    NotFoundError,
    RegionNotEnabledError,
    UserAlreadyActiveError,
)
from fractal.events import EventKind, record_event
from fractal.fleet.mandelboxes import (
    AnswerToStore,
    SlotRequest,
    allocate_first_choice,
    allocate_in_one_statement,
    allocate_waiting,
    limit_checked_by_allocate_waiting,
    live_count_for_user,
    move_mandelboxes,
    move_user_mandelbox,
)
from fractal.fleet.views import MandelboxView, get_mandelbox_view
from fractal.images import active_image_summary
from fractal.models import EndReason, IdempotencyKey, Instance, InstanceStatus, Mandelbox, MandelboxStatus

LOCAL_DEV_COMMIT_HASH = "local_dev"
NO_CAPACITY_RETRY_AFTER_S = 10
# Only successful assigns are remembered under an Idempotency-Key; the view answers them 201 Created.
# Refusals (409/422/503) are not stored: a retried refusal is evaluated again, since the state that caused
# it (the user's live mandelboxes, enabled regions, free capacity) may have changed, and nothing was created.
IDEMPOTENT_SUCCESS_STATUS = 201
DEFAULT_IDEMPOTENCY_TTL_S = 24 * 3600
# Expired keys are purged opportunistically, a bounded batch whenever a new key is stored.
IDEMPOTENCY_PURGE_BATCH = 100


@dataclass(frozen=True)
class Assignment:
    mandelbox_id: uuid.UUID
    instance_name: str
    ip: str | None
    region: str
    status: MandelboxStatus

    def to_body(self) -> dict[str, Any]:
        """The JSON answer of a successful assign (also what an Idempotency-Key replays)."""
        return {
            "mandelbox_id": str(self.mandelbox_id),
            "ip": self.ip,
            "region": self.region,
            "instance_name": self.instance_name,
            "status": str(self.status),
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Assignment:
        return cls(
            mandelbox_id=uuid.UUID(body["mandelbox_id"]),
            instance_name=body["instance_name"],
            ip=body["ip"],
            region=body["region"],
            status=MandelboxStatus(body["status"]),
        )


@dataclass(frozen=True)
class AssignResult:
    """An assignment, and whether it is the stored answer to an earlier request with the same key."""

    assignment: Assignment
    replayed: bool = False


@dataclass(frozen=True)
class IdempotencyRequest:
    """An Idempotency-Key and the fingerprint of the request body it was sent with."""

    key: str
    request_hash: str
    ttl_s: int = DEFAULT_IDEMPOTENCY_TTL_S


def request_fingerprint(*, regions: Sequence[str], client_commit_hash: str, session_id: str | None) -> str:
    """sha256 of the canonical assign body: a key reused with another body is refused."""
    canonical = json.dumps(
        {"regions": list(regions), "client_commit_hash": client_commit_hash, "session_id": session_id},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def assign_mandelbox(
    session: Session,
    *,
    user_id: str,
    regions: Sequence[str],
    client_commit_hash: str,
    session_id: str | None = None,
    max_per_user: int = 1,
    allow_local_dev: bool = False,
    on_no_capacity: Callable[[Sequence[str], str], None] | None = None,
    idempotency_key: str | None = None,
    idempotency_ttl_s: int = DEFAULT_IDEMPOTENCY_TTL_S,
    cache: CacheReader | None = None,
) -> AssignResult:
    """Give ``user_id`` a mandelbox on the fullest suitable instance of the first region with room.

    Args:
        regions: requested regions, nearest first; unknown or disabled ones are skipped.
        client_commit_hash: the client's version; only instances running exactly it qualify
            (``local_dev`` means each region's newest active image when ``allow_local_dev``).
        on_no_capacity: called with (regions, commit) when nothing had room, e.g. to wake the scaler.
        idempotency_key: the request's Idempotency-Key; a success is stored under it (with a fingerprint of
            the request, for ``idempotency_ttl_s``) in the same transaction as the mandelbox, and a later
            request with that key (from any replica) gets the same answer.
        cache: where the enabled regions / newest images are read from (the database when None).

    Returns:
        The new ALLOCATED mandelbox and where to connect, or the stored first answer for a repeated key.

    Raises:
        UserAlreadyActiveError, RegionNotEnabledError, CommitHashMismatchError, NoInstanceAvailableError,
        IdempotencyKeyReusedError (the key was used with a different body and has not expired).
    """
    idempotency = None
    if idempotency_key is not None:
        fingerprint = request_fingerprint(regions=regions, client_commit_hash=client_commit_hash, session_id=session_id)
        idempotency = IdempotencyRequest(key=idempotency_key, request_hash=fingerprint, ttl_s=idempotency_ttl_s)
    try:
        result = _assign_in_transaction(
            session,
            user_id=user_id,
            regions=regions,
            client_commit_hash=client_commit_hash,
            session_id=session_id,
            max_per_user=max_per_user,
            allow_local_dev=allow_local_dev,
            idempotency=idempotency,
            cache=cache,
        )
    except FractalError as refusal:
        # A refusal is decided before anything is written (the one exception, an expired key's stored answer
        # dropped, may as well stay dropped), so its audit event joins the transaction: one COMMIT, where a
        # rollback and a transaction of its own would cost three more round trips.
        _record_refusal(session, user_id=user_id, regions=regions, commit=client_commit_hash, error=refusal)
        if isinstance(refusal, NoInstanceAvailableError) and on_no_capacity is not None:
            on_no_capacity(regions, client_commit_hash)
        raise
    if session.in_transaction():  # not when the one-round-trip try committed in a transaction of its own
        session.commit()
    return result


def _assign_in_transaction(
    session: Session,
    *,
    user_id: str,
    regions: Sequence[str],
    client_commit_hash: str,
    session_id: str | None,
    max_per_user: int,
    allow_local_dev: bool,
    idempotency: IdempotencyRequest | None,
    cache: CacheReader | None,
) -> AssignResult:
    # Serialise this user's assigns so that counting live mandelboxes and adding one is atomic, and so that
    # concurrent retries with one Idempotency-Key queue here: the first stores its answer and commits, the
    # others then find it (each statement under READ COMMITTED sees rows committed before it began).
    # On Postgres the lock travels in the same round trip as the statement that needs it (the stored-answer read,
    # else the first allocation): two statements in one query, run in order, each with its own snapshot, so the
    # second sees everything committed before the lock was granted.
    fast = is_postgres(session)
    tried = _FirstTry()
    if fast:
        tried = _first_choice(
            session,
            user_id=user_id,
            regions=regions,
            client_commit_hash=client_commit_hash,
            session_id=session_id,
            max_per_user=max_per_user,
            allow_local_dev=allow_local_dev,
            idempotency=idempotency,
            cache=cache,
        )
        if tried.result is not None:
            return tried.result
        # Not settled in one round trip (no enabled region, or no unlocked instance with room in the nearest one):
        # the general path below, in the same transaction. Once the first try took the user's lock, what it read
        # under it (the stored answer, the live count) cannot have changed: only an expired answer is left to drop.
    lock_key: int | None = advisory_key(f"fractal:user:{user_id}") if fast and not tried.locked else None
    if not fast:
        advisory_xact_lock(session, f"fractal:user:{user_id}")
    if tried.locked:
        if tried.expired_answer and idempotency is not None:
            session.execute(_DROP_STORED_ANSWER, {"user_id": user_id, "key": idempotency.key})
    elif idempotency is not None:
        stored = _stored_answer(session, user_id=user_id, idempotency=idempotency, lock_key=lock_key)
        lock_key = None  # taken
        if stored is not None:
            return AssignResult(stored, replayed=True)

    summary = tried.summary if tried.summary is not None else active_image_summary(session, cache=cache)
    enabled = set(summary["regions"])
    candidates = list(dict.fromkeys(region for region in regions if region in enabled))
    if not candidates:
        raise RegionNotEnabledError(details={"regions": list(regions)})

    use_newest = allow_local_dev and client_commit_hash == LOCAL_DEV_COMMIT_HASH
    newest: dict[str, str] = dict(summary["newest"]) if use_newest else {}
    mandelbox_id = uuid.uuid4()
    actor = f"user:{user_id}"
    # SQLite checks the limit in the statement that takes the slot: the user's live mandelboxes are counted only
    # when it took none, to tell "over the limit" from "no room" (the same answer as counting first).
    limit_in_take = not fast and limit_checked_by_allocate_waiting(session)
    if not fast and not limit_in_take and live_count_for_user(session, user_id) >= max_per_user:
        raise UserAlreadyActiveError(details={"max_mandelboxes_per_user": max_per_user})
    for region in candidates:
        commit = newest.get(region, client_commit_hash)
        wanted = SlotRequest(
            mandelbox_id=mandelbox_id,
            user_id=user_id,
            session_id=session_id,
            region=region,
            client_commit_hash=commit,
            max_per_user=max_per_user,
            actor=actor,
        )
        # A nearer region whose candidates are merely locked by concurrent assigns is waited for before a
        # farther one is tried: region order is the user's preference.
        slot = None
        if fast and region != tried.region:  # the first try did this one's skip-locked pick already
            slot = allocate_in_one_statement(session, wanted, user_lock_key=lock_key)
            lock_key = None  # taken with the first allocation
        elif fast:
            if tried.no_room:
                continue  # no committed row had room there, locked or not: nothing to wait for
            if not tried.locked:
                # The first try's transaction is over: its lock and live count are gone. Waiting creates the
                # mandelbox in this one, so the limit is checked again under the user's lock.
                _lock_and_check_limit(session, user_id=user_id, max_per_user=max_per_user, lock_key=lock_key)
                lock_key = None
        slot = slot or allocate_waiting(session, wanted)
        if slot is None:
            if limit_in_take:
                if live_count_for_user(session, user_id) >= max_per_user:
                    raise UserAlreadyActiveError(details={"max_mandelboxes_per_user": max_per_user})
                limit_in_take = False  # counted once: under the limit, a later region's empty take means no room
            continue
        assignment = Assignment(
            mandelbox_id=mandelbox_id,
            instance_name=slot.instance_name,
            ip=slot.ip,
            region=slot.region,
            status=MandelboxStatus.ALLOCATED,
        )
        if idempotency is not None:
            _store_answer(session, user_id=user_id, idempotency=idempotency, assignment=assignment)
        return AssignResult(assignment)

    if tried.no_room and candidates == [tried.region]:
        mismatch = tried.other_room  # the first try looked at the one region already
    else:
        mismatch = _other_versions_have_room(session, candidates, client_commit_hash, newest)
    if mismatch:
        raise CommitHashMismatchError(details={"client_commit_hash": client_commit_hash})
    raise NoInstanceAvailableError(retry_after_s=NO_CAPACITY_RETRY_AFTER_S)


@dataclass(frozen=True)
class _FirstTry:
    """What the one-round-trip try left for the general path."""

    result: AssignResult | None = None  # settled
    locked: bool = False  # the user's lock is held, the stored answer and live count were read under it
    summary: dict[str, Any] | None = None  # the active-image summary it read
    region: str | None = None  # the region whose unlocked instances it tried
    expired_answer: bool = False  # the key held an expired answer (still there)
    no_room: bool = False  # its region had no room on the commit, locked or not (committed rows)
    other_room: bool = False  # ... but had some on another commit


def _first_choice(
    session: Session,
    *,
    user_id: str,
    regions: Sequence[str],
    client_commit_hash: str,
    session_id: str | None,
    max_per_user: int,
    allow_local_dev: bool,
    idempotency: IdempotencyRequest | None,
    cache: CacheReader | None,
) -> _FirstTry:
    """Postgres: settle the common assign in one round trip (see allocate_first_choice): the user's lock, the stored
    answer, the live count and a slot in the nearest enabled region. Its result is None when it could not be
    settled there (nothing was written then); the caller then goes on with the general path.

    Raises what the general path would, in the same order: a live stored answer first (replay or reuse), then the
    per-user limit."""
    summary = active_image_summary(session, cache=cache)
    enabled = summary["regions"]
    nearest = next((region for region in regions if region in enabled), None)
    if nearest is None:
        return _FirstTry(summary=summary)  # the general path answers (a replay first, else RegionNotEnabled)
    use_newest = allow_local_dev and client_commit_hash == LOCAL_DEV_COMMIT_HASH
    commit = summary["newest"].get(nearest, client_commit_hash) if use_newest else client_commit_hash
    mandelbox_id = uuid.uuid4()
    wanted = SlotRequest(
        mandelbox_id=mandelbox_id,
        user_id=user_id,
        session_id=session_id,
        region=nearest,
        client_commit_hash=commit,
        max_per_user=max_per_user,
        actor=f"user:{user_id}",
    )
    answer = (
        AnswerToStore(
            key=idempotency.key,
            request_hash=idempotency.request_hash,
            ttl_s=idempotency.ttl_s,
            response_status=IDEMPOTENT_SUCCESS_STATUS,
            purge_batch=IDEMPOTENCY_PURGE_BATCH,
        )
        if idempotency is not None
        else None
    )
    found = allocate_first_choice(session, wanted, user_lock_key=advisory_key(f"fractal:user:{user_id}"), answer=answer)
    stored = found.stored
    if stored is not None and not stored.expired:
        if idempotency is None or stored.request_hash != idempotency.request_hash:
            raise IdempotencyKeyReusedError()
        return _FirstTry(AssignResult(Assignment.from_body(stored.response_body), replayed=True))
    if found.live_count >= max_per_user:
        raise UserAlreadyActiveError(details={"max_mandelboxes_per_user": max_per_user})
    if found.slot is None:
        # In a transaction of its own, the try is over and the user's lock released: the general path starts over.
        held = not found.own_transaction
        return _FirstTry(
            locked=held,
            summary=summary,
            region=nearest,
            expired_answer=held and stored is not None,
            no_room=not found.room,
            other_room=found.other_room,
        )
    slot = found.slot
    result = AssignResult(
        Assignment(
            mandelbox_id=mandelbox_id,
            instance_name=slot.instance_name,
            ip=slot.ip,
            region=slot.region,
            status=MandelboxStatus.ALLOCATED,
        )
    )
    return _FirstTry(result)


# Statements of the idempotency path, built once: constructing a statement costs more CPU than running it on a
# warm connection (the compiled form is cached, keyed by the statement's shape; values travel as parameters).
_HAS_STORED_ANSWER = select(IdempotencyKey.key).where(
    IdempotencyKey.user_id == bindparam("user_id"),
    IdempotencyKey.key == bindparam("key"),
    IdempotencyKey.expires_at > db_now(),
)
_STORED_ANSWER = select(
    IdempotencyKey.request_hash,
    IdempotencyKey.response_body,
    (IdempotencyKey.expires_at <= db_now()).label("expired"),
).where(IdempotencyKey.user_id == bindparam("user_id"), IdempotencyKey.key == bindparam("key"))
_DROP_STORED_ANSWER = (
    delete(IdempotencyKey)
    .where(IdempotencyKey.user_id == bindparam("user_id"), IdempotencyKey.key == bindparam("key"))
    .execution_options(synchronize_session=False)
)


def has_stored_answer(session: Session, *, user_id: str, idempotency_key: str) -> bool:
    """True when this user's Idempotency-Key holds a live stored answer (a retry would be a replay).

    The assign rate limit asks this first: replaying a stored answer creates nothing and costs one indexed read, so
    a client retrying one key is never refused 429 for it. The read opens the transaction the assign then
    continues (no commit in between: that would cost a COMMIT, a BEGIN and the transaction bounds again); the
    assign decides on what it reads after taking the user's lock, never on this answer.
    """
    live = session.execute(_HAS_STORED_ANSWER, {"user_id": user_id, "key": idempotency_key}).first()
    return live is not None


# Postgres: the user's lock, then the stored answer, in one round trip (see _assign_in_transaction).
_LOCK_THEN_STORED_ANSWER = text(
    """
SELECT pg_advisory_xact_lock(:lock_key);
SELECT request_hash, response_body, expires_at <= CURRENT_TIMESTAMP AS expired
FROM idempotency_keys WHERE user_id = :user_id AND key = :key
"""
)


_LOCK_THEN_LIVE_COUNT = text(
    """
SELECT pg_advisory_xact_lock(:lock_key);
SELECT count(*) FROM mandelboxes WHERE user_id = :user_id AND status <> 'EXITED'
"""
)


def _lock_and_check_limit(session: Session, *, user_id: str, max_per_user: int, lock_key: int | None) -> None:
    """Postgres: take the user's lock (unless ``lock_key`` is None: already held) and count their live mandelboxes
    under it, in one round trip.

    Raises:
        UserAlreadyActiveError.
    """
    if lock_key is None:
        live = live_count_for_user(session, user_id)
    else:
        live = int(session.execute(_LOCK_THEN_LIVE_COUNT, {"lock_key": lock_key, "user_id": user_id}).scalar_one())
    if live >= max_per_user:
        raise UserAlreadyActiveError(details={"max_mandelboxes_per_user": max_per_user})


def _stored_answer(
    session: Session, *, user_id: str, idempotency: IdempotencyRequest, lock_key: int | None = None
) -> Assignment | None:
    """The answer stored under this user's key, None if there is none (an expired one is dropped).

    ``lock_key``: take this advisory lock first, in the same round trip (Postgres only).

    Raises:
        IdempotencyKeyReusedError: the key is live but was sent with a different body.
    """
    names = {"user_id": user_id, "key": idempotency.key}
    if lock_key is not None:
        found = session.execute(_LOCK_THEN_STORED_ANSWER, {"lock_key": lock_key, **names}).first()
    else:
        found = session.execute(_STORED_ANSWER, names).first()
    if found is None:
        return None
    if found.expired:  # judged on the database's clock, like every replica judges it
        session.execute(_DROP_STORED_ANSWER, names)
        return None
    if found.request_hash != idempotency.request_hash:
        raise IdempotencyKeyReusedError()
    return Assignment.from_body(found.response_body)


def _store_answer(session: Session, *, user_id: str, idempotency: IdempotencyRequest, assignment: Assignment) -> None:
    values = {
        "user_id": user_id,
        "key": idempotency.key,
        "request_hash": idempotency.request_hash,
        "response_status": IDEMPOTENT_SUCCESS_STATUS,
        "response_body": assignment.to_body(),
        "mandelbox_id": assignment.mandelbox_id,
    }
    postgres = is_postgres(session)
    session.execute(_store_answer_statement(idempotency.ttl_s, postgres=postgres), values)
    if not postgres:
        session.execute(_purge_expired_keys_statement(postgres=False))


@functools.cache
def _store_answer_statement(ttl_s: int, *, postgres: bool) -> Insert:
    """The insert of a stored answer (built once per TTL); on Postgres the purge of a bounded batch of expired keys
    rides along as a data-modifying CTE, one round trip for both. The CTE cannot touch the new row: a CTE and its
    statement see one snapshot, which does not hold the row being inserted."""
    store = insert(IdempotencyKey).values(
        {
            IdempotencyKey.user_id: bindparam("user_id"),
            IdempotencyKey.key: bindparam("key"),
            IdempotencyKey.request_hash: bindparam("request_hash"),
            IdempotencyKey.response_status: bindparam("response_status"),
            IdempotencyKey.response_body: bindparam("response_body", type_=IdempotencyKey.response_body.type),
            IdempotencyKey.mandelbox_id: bindparam("mandelbox_id", type_=IdempotencyKey.mandelbox_id.type),
            IdempotencyKey.created_at: db_now(),
            IdempotencyKey.expires_at: db_now(ttl_s),
        }
    )
    if postgres:
        return store.add_cte(_purge_expired_keys_statement(postgres=True).cte("purged"))
    return store


@functools.cache
def _purge_expired_keys_statement(*, postgres: bool) -> Delete | ReturningDelete[str]:
    """Delete a bounded batch of expired keys (any user's); a key replaced meanwhile is a newer row, kept."""
    expired = (
        select(IdempotencyKey.user_id, IdempotencyKey.key)
        .where(IdempotencyKey.expires_at <= db_now())
        .limit(IDEMPOTENCY_PURGE_BATCH)
    )
    if postgres:
        # Rows another transaction is replacing right now are skipped, never waited for.
        expired = expired.with_for_update(skip_locked=True)
    purge = (
        delete(IdempotencyKey)
        .where(tuple_(IdempotencyKey.user_id, IdempotencyKey.key).in_(expired), IdempotencyKey.expires_at <= db_now())
        .execution_options(synchronize_session=False)
    )
    return purge.returning(IdempotencyKey.key) if postgres else purge


# Built once (with expanding parameters): a refusal pays the statement, not its construction and cache key.
_OTHER_VERSIONS_WITH_ROOM = (
    select(Instance.instance_name)
    .where(
        Instance.region.in_(bindparam("regions", expanding=True)),
        Instance.status == InstanceStatus.ACTIVE,
        Instance.live_mandelboxes < Instance.mandelbox_capacity,
        Instance.client_commit_hash.not_in(bindparam("commits", expanding=True)),
    )
    .limit(1)
)


def _other_versions_have_room(session: Session, regions: Sequence[str], commit: str, newest: dict[str, str]) -> bool:
    wanted = sorted({newest.get(region, commit) for region in regions})
    found = session.execute(_OTHER_VERSIONS_WITH_ROOM, {"regions": list(regions), "commits": wanted}).first()
    return found is not None


def refusal_event(*, user_id: str, regions: Sequence[str], commit: str, error: FractalError) -> dict[str, Any]:
    """The audit event a refused assign records (what the scaler's demand reads count as waiting users)."""
    return {
        "kind": EventKind.ASSIGNMENT_REFUSED,
        "actor": f"user:{user_id}",
        "detail": {"code": str(error.code), "regions": list(regions)[:20], "client_commit_hash": commit},
    }


def _record_refusal(
    session: Session, *, user_id: str, regions: Sequence[str], commit: str, error: FractalError
) -> None:
    record_event(session, **refusal_event(user_id=user_id, regions=regions, commit=commit, error=error))
    session.commit()


def get_mandelbox_for_user(session: Session, *, user_id: str, mandelbox_id: uuid.UUID) -> MandelboxView:
    """The owner's view of one mandelbox; another user's id is indistinguishable from an unknown one.

    Raises:
        NotFoundError.
    """
    view = get_mandelbox_view(session, mandelbox_id=mandelbox_id)
    if view is None or view.user_id != user_id:
        raise NotFoundError("No such mandelbox.")
    return view


def delete_mandelbox_for_user(session: Session, *, user_id: str, mandelbox_id: uuid.UUID) -> MandelboxView:
    """A user ends their mandelbox: a live one becomes DYING and its host is told on its next heartbeat.

    Deleting one that already ended (or is already DYING) changes nothing.

    Raises:
        NotFoundError.
    """
    if is_postgres(session):
        # One statement (lock, move when allowed, event, the answer) and its commit; see move_user_mandelbox.
        moved = move_user_mandelbox(
            session,
            mandelbox_id=mandelbox_id,
            user_id=user_id,
            to=MandelboxStatus.DYING,
            reason=EndReason.USER_DELETED,
            actor=f"user:{user_id}",
            event_kind=EventKind.MANDELBOX_DELETED,
        )
        if session.in_transaction():  # the caller's transaction (tests); a request's ran in its own
            session.commit()
        if moved is None:
            raise NotFoundError("No such mandelbox.")
        return MandelboxView.model_validate(moved)
    owner = session.execute(select(Mandelbox.user_id).where(Mandelbox.mandelbox_id == mandelbox_id)).scalar()
    if owner != user_id:
        session.rollback()
        raise NotFoundError("No such mandelbox.")
    # The end reason is remembered now, so the host's later EXITED report is attributed to the user. A box that
    # already ended or is DYING does not move (the table allows DYING only from the live statuses before it).
    move_mandelboxes(
        session,
        where=(Mandelbox.mandelbox_id == mandelbox_id) & (Mandelbox.user_id == user_id),
        to=MandelboxStatus.DYING,
        reason=EndReason.USER_DELETED,
        actor=f"user:{user_id}",
        event_kind=EventKind.MANDELBOX_DELETED,
    )
    # Read back before the commit, in the same transaction: it sees the move, and the answer costs no second
    # transaction (BEGIN, bounds, the read, its end: three more round trips) after the commit.
    view = get_mandelbox_view(session, mandelbox_id=mandelbox_id)
    session.commit()
    assert view is not None
    return view


__all__ = [
    "AssignResult",
    "Assignment",
    "IdempotencyRequest",
    "assign_mandelbox",
    "delete_mandelbox_for_user",
    "get_mandelbox_for_user",
    "refusal_event",
    "request_fingerprint",
]
