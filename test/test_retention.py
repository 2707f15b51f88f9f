"""History retention on real Postgres (and moto S3): what is past its retention is purged in bounded batches, what
is younger or still live is kept, a purge waits for no row a request holds and does not hold up assignment, the
scaler loop runs it under its lease, and the cut-offs are the database's clock."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import sessionmaker

from alembic import command
from fractal.assignment.service import assign_mandelbox
from fractal.clock import database_now
from fractal.cloud.memory import MemoryCloud
from fractal.config import Settings
from fractal.database import SessionFactory
from fractal.metrics import PURGED_ROWS
from fractal.migrations import run_alembic
from fractal.models import (
    EndReason,
    Event,
    Heartbeat,
    IdempotencyKey,
    Instance,
    InstanceStatus,
    LogSender,
    LogUpload,
    Mandelbox,
    MandelboxStatus,
)
from fractal.retention import PurgeKind, S3LogObjects, purge_history
from fractal.scaling.lease import SCALER_LEASE, acquire_lease
from fractal.scaling.runner import ScalerLoop
from test.factories import Factories

ROOT = Path(__file__).resolve().parent.parent
FAKETIME = shutil.which("faketime")
BUCKET = "fractal-retention-test"
OLD = timedelta(days=200)
YOUNG = timedelta(days=1)


def _settings(settings: Settings, **overrides: Any) -> Settings:
    return Settings(**{**settings.model_dump(), **overrides})


def _counts(factory: SessionFactory) -> dict[str, int]:
    with factory() as session:
        return {
            model.__tablename__: int(session.execute(select(func.count()).select_from(model)).scalar_one())
            for model in (Event, Mandelbox, Instance, Heartbeat, IdempotencyKey, LogUpload)
        }


def _image(f: Factories) -> None:
    f.image(region="us-east-1", client_commit_hash="abc123", mandelbox_capacity=10_000, target_free=0)


def _box(instance: str, *, ended: datetime | None, created: datetime, user: str = "u") -> Mandelbox:
    return Mandelbox(
        mandelbox_id=uuid.uuid4(),
        instance_name=instance,
        user_id=user,
        status=MandelboxStatus.EXITED if ended else MandelboxStatus.RUNNING,
        created_at=created,
        status_changed_at=ended or created,
        ended_at=ended,
        end_reason=EndReason.HOST_EXITED if ended else None,
    )


@pytest.fixture
def s3(aws_env: str) -> Iterator[Any]:
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client


def test_old_history_goes_young_and_live_rows_stay(
    committed_factory: SessionFactory, settings: Settings, s3: Any
) -> None:
    with committed_factory() as session:
        now = database_now(session)
        f = Factories(session)
        _image(f)
        # An ACTIVE host older than any retention, with a live box as old: neither is ever purged.
        old_active, _ = f.instance(instance_name="old-active", created_at=now - OLD, status_changed_at=now - OLD)
        live = _box(old_active.instance_name, ended=None, created=now - OLD)
        old_exited = _box(old_active.instance_name, ended=now - OLD, created=now - OLD)
        young_exited = _box(old_active.instance_name, ended=now - YOUNG, created=now - OLD)
        # Hosts terminated long ago (one whose last box is gone with it, one whose box keeps a young log), lately,
        # and one LOST long ago (not final: never purged).
        gone, _ = f.instance(instance_name="gone", status=InstanceStatus.TERMINATED, status_changed_at=now - OLD)
        held, _ = f.instance(instance_name="held", status=InstanceStatus.TERMINATED, status_changed_at=now - OLD)
        recent, _ = f.instance(instance_name="recent", status=InstanceStatus.TERMINATED, status_changed_at=now - YOUNG)
        f.instance(instance_name="lost", status=InstanceStatus.LOST, status_changed_at=now - OLD)
        on_gone = _box(gone.instance_name, ended=now - OLD, created=now - OLD)
        with_young_log = _box(held.instance_name, ended=now - OLD, created=now - OLD)
        session.add_all([live, old_exited, young_exited, on_gone, with_young_log])
        session.flush()
        session.add_all(
            [Heartbeat(instance_name=i.instance_name, last_heartbeat_at=now - OLD, metrics={}) for i in (gone, recent)]
            + [Heartbeat(instance_name="old-active", last_heartbeat_at=now - OLD, metrics={})]
        )
        logs = {"old": (on_gone, now - OLD), "young": (with_young_log, now - YOUNG)}
        for name, (box, at) in logs.items():
            key = f"logs/test/{name}.log"
            s3.put_object(Bucket=BUCKET, Key=key, Body=b"log")
            session.add(
                LogUpload(mandelbox_id=box.mandelbox_id, sender=LogSender.HOST, key=key, size=3, uploaded_at=at)
            )
        session.add_all(
            [Event(kind="old", actor="t", created_at=now - OLD - timedelta(seconds=n), detail={}) for n in range(7)]
            + [Event(kind="young", actor="t", created_at=now - YOUNG, detail={})]
        )
        for key, expires in (("expired-long-ago", -2 * 86400), ("expired-lately", -3600), ("live", 3600)):
            session.add(
                IdempotencyKey(
                    user_id="u",
                    key=key,
                    request_hash="h",
                    response_status=201,
                    response_body={},
                    expires_at=now + timedelta(seconds=expires),
                )
            )
        session.commit()
        ids = {
            b.mandelbox_id: name
            for b, name in (
                (live, "live"),
                (old_exited, "old_exited"),
                (young_exited, "young_exited"),
                (on_gone, "on_gone"),
                (with_young_log, "with_young_log"),
            )
        }

    batches: list[tuple[PurgeKind, int]] = []
    grace = _settings(settings, retention_idempotency_keys_hours=1.5)  # a key expired an hour ago stays
    with committed_factory() as session:
        report = purge_history(
            session,
            settings=grace,
            log_objects=S3LogObjects(BUCKET, s3),
            batch_size=3,
            on_batch=lambda kind, n: batches.append((kind, n)),
        )
    assert report.errors == [] and report.complete
    assert report.purged == {
        "idempotency_keys": 1,
        "events": 7,
        "log_uploads": 1,
        "mandelboxes": 2,
        "heartbeats": 1,
        "instances": 1,
    }
    # Seven old events in batches of three: 3 + 3 + 1, each committed on its own.
    assert [n for kind, n in batches if kind is PurgeKind.EVENTS] == [3, 3, 1]
    assert all(n <= 3 for _, n in batches)

    with committed_factory() as session:
        boxes = {ids[b] for b in session.scalars(select(Mandelbox.mandelbox_id))}
        instances = set(session.scalars(select(Instance.instance_name)))
        heartbeats = set(session.scalars(select(Heartbeat.instance_name)))
        events = list(session.scalars(select(Event.kind)))
        keys = set(session.scalars(select(IdempotencyKey.key)))
        log_keys = set(session.scalars(select(LogUpload.key)))
    assert boxes == {"live", "young_exited", "with_young_log"}
    assert instances == {"old-active", "held", "recent", "lost"}
    assert heartbeats == {"old-active", "recent"}
    assert events == ["young"]
    assert keys == {"expired-lately", "live"}
    assert log_keys == {"logs/test/young.log"}
    stored = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    assert stored == {"logs/test/young.log"}, "the purged row's object is deleted, the kept one's is not"

    # Nothing is left past its retention: a second run deletes nothing.
    with committed_factory() as session:
        again = purge_history(session, settings=grace, log_objects=S3LogObjects(BUCKET, s3))
    assert again.total == 0


def test_an_unreachable_bucket_keeps_the_log_rows_and_their_mandelboxes(
    committed_factory: SessionFactory, settings: Settings, aws_env: str
) -> None:
    with committed_factory() as session:
        now = database_now(session)
        f = Factories(session)
        _image(f)
        host, _ = f.instance(instance_name="h")
        box = _box(host.instance_name, ended=now - OLD, created=now - OLD)
        session.add(box)
        session.flush()
        session.add(
            LogUpload(mandelbox_id=box.mandelbox_id, sender=LogSender.CLIENT, key="k", size=1, uploaded_at=now - OLD)
        )
        session.add(Event(kind="old", actor="t", created_at=now - OLD, detail={}))
        session.commit()
    with committed_factory() as session:
        report = purge_history(session, settings=settings, log_objects=S3LogObjects("no-such-bucket"))
    assert report.errors and report.errors[0].startswith("log_uploads:"), report.errors
    # The other kinds went on; the box stays while its log row does.
    assert report.purged["events"] == 1 and report.purged["mandelboxes"] == 0
    assert _counts(committed_factory)["log_uploads"] == 1 and _counts(committed_factory)["mandelboxes"] == 1


def _seed_bulk_history(engine: Engine, *, events: int, boxes: int) -> None:
    """Old history, set-based: ``events`` events and ``boxes`` EXITED mandelboxes on host ``bulk``."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO events (created_at, kind, actor, detail) "
                "SELECT now() - interval '200 days' - make_interval(secs => n), 'bulk', 'test', '{}'::jsonb "
                "FROM generate_series(1, CAST(:n AS int)) AS n"
            ),
            {"n": events},
        )
        connection.execute(
            text(
                "INSERT INTO mandelboxes (mandelbox_id, instance_name, user_id, status, created_at, "
                "status_changed_at, ended_at, end_reason) "
                "SELECT md5('bulk-' || n)::uuid, 'bulk', 'bulk-user-' || n, 'EXITED', "
                "now() - interval '201 days', now() - interval '200 days', "
                "now() - interval '200 days' - make_interval(secs => n), 'HOST_EXITED' "
                "FROM generate_series(1, CAST(:n AS int)) AS n"
            ),
            {"n": boxes},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE events, mandelboxes"))


def test_a_big_purge_runs_in_short_batches_and_assignment_goes_on(
    committed_factory: SessionFactory, settings: Settings, engine: Engine
) -> None:
    events, boxes, batch = 120_000, 20_000, 1_000
    with committed_factory() as session:
        f = Factories(session)
        _image(f)
        f.instance(instance_name="bulk", mandelbox_capacity=10_000)
    _seed_bulk_history(engine, events=events, boxes=boxes)

    def assign(n: int) -> float:
        started = time.perf_counter()
        with committed_factory() as session:
            assign_mandelbox(
                session, user_id=f"assigner-{n}", regions=["us-east-1"], client_commit_hash="abc123", max_per_user=1
            )
        return time.perf_counter() - started

    baseline = [assign(n) for n in range(10)]
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def purge() -> None:
        started = time.perf_counter()
        try:
            with committed_factory() as session:
                # No pause between batches: the purge at full speed is the worst case for assignment.
                eager = _settings(settings, purge_pause_ms=0)
                outcome["report"] = purge_history(session, settings=eager, batch_size=batch, max_s=120)
        finally:
            outcome["duration_s"] = time.perf_counter() - started
            done.set()

    seen_events: set[int] = set()
    during: list[float] = []
    purger = threading.Thread(target=purge, name="purge")
    purger.start()
    try:
        n = 100
        while not done.is_set() and n < 10_000:
            during.append(assign(n))
            n += 1
            with committed_factory() as session:
                seen_events.add(int(session.execute(select(func.count()).select_from(Event)).scalar_one()))
    finally:
        purger.join(150)
    assert not purger.is_alive()
    report = outcome["report"]
    assert report.errors == [] and report.complete
    assert report.purged["events"] == events and report.purged["mandelboxes"] == boxes
    # Many short transactions, each committed: another session saw the table shrink step by step.
    assert report.batches >= (events + boxes) // batch
    assert len({count for count in seen_events if 0 < count < events}) >= 3, sorted(seen_events)[:10]
    # Assignment went on all along, never held up for long (the purge locks only rows nobody assigns from).
    purge_s = outcome["duration_s"]
    assert len(during) >= 5, (len(during), purge_s)
    assert max(during) < max(1.0, purge_s / 4), (max(during), purge_s)
    assert statistics.median(during) < max(0.25, 10 * statistics.median(baseline)), (during, baseline)
    print(
        f"purged {report.total} rows in {report.batches} batches, {purge_s:.2f}s; assign p50 "
        f"{statistics.median(baseline) * 1000:.1f} ms before, {statistics.median(during) * 1000:.1f} ms during "
        f"(max {max(during) * 1000:.1f} ms, {len(during)} assigns)"
    )


def test_a_row_a_transaction_holds_is_skipped_not_waited_for(
    committed_factory: SessionFactory, settings: Settings, engine: Engine
) -> None:
    with committed_factory() as session:
        f = Factories(session)
        _image(f)
        f.instance(instance_name="bulk")
    _seed_bulk_history(engine, events=0, boxes=50)
    held = uuid.UUID(hashlib.md5(b"bulk-7").hexdigest())
    with engine.connect() as holder:
        holder.execute(text("SELECT 1 FROM mandelboxes WHERE mandelbox_id = :id FOR UPDATE"), {"id": held})
        started = time.perf_counter()
        with committed_factory() as session:
            report = purge_history(session, settings=settings, batch_size=10)
        elapsed = time.perf_counter() - started
        holder.rollback()
    assert report.purged["mandelboxes"] == 49 and elapsed < 2.0, (report.as_dict(), elapsed)
    with committed_factory() as session:
        assert list(session.scalars(select(Mandelbox.mandelbox_id))) == [held]
        report = purge_history(session, settings=settings)
    assert report.purged["mandelboxes"] == 1


def test_the_scaler_loop_purges_under_its_lease_every_interval(
    committed_factory: SessionFactory, settings: Settings, engine: Engine
) -> None:
    loop_settings = _settings(settings, purge_interval_s=3600, retention_delete_log_objects=False)
    _seed_bulk_history(engine, events=30, boxes=0)
    before = PURGED_ROWS.labels(kind="events")._value.get()

    # Another scaler holds the lease: this one's pass is skipped, and so is its purge.
    with committed_factory() as session:
        assert acquire_lease(session, name=SCALER_LEASE, holder="someone-else", ttl_s=60) is not None
    loop = ScalerLoop(settings=loop_settings, session_factory=committed_factory, cloud=MemoryCloud())
    skipped = loop.run_once()
    assert skipped is not None and not skipped.ran and skipped.purge is None
    assert _counts(committed_factory)["events"] == 30
    with committed_factory() as session:
        session.execute(text("DELETE FROM leases"))
        session.commit()

    first = loop.run_once()
    assert first is not None and first.ran and first.purge is not None
    assert first.purge.purged["events"] == 30
    assert first.as_dict()["purge"]["purged"]["events"] == 30
    assert PURGED_ROWS.labels(kind="events")._value.get() - before == 30
    # Not due again for an hour: the next pass purges nothing, even with new old history.
    _seed_bulk_history(engine, events=5, boxes=0)
    second = loop.run_once()
    assert second is not None and second.ran and second.purge is None
    assert _counts(committed_factory)["events"] >= 5


def test_a_purge_cut_short_by_its_time_bound_goes_on_at_the_next_pass(
    committed_factory: SessionFactory, settings: Settings, engine: Engine
) -> None:
    _seed_bulk_history(engine, events=5_000, boxes=0)
    loop_settings = _settings(
        settings, purge_interval_s=3600, purge_batch_size=100, purge_max_s=0.001, retention_delete_log_objects=False
    )
    loop = ScalerLoop(settings=loop_settings, session_factory=committed_factory, cloud=MemoryCloud())
    first = loop.run_once()
    assert first is not None and first.purge is not None and not first.purge.complete
    left = _counts(committed_factory)["events"]
    assert left > 0
    second = loop.run_once()  # behind: due again at once, not in an hour
    assert second is not None and second.purge is not None
    assert _counts(committed_factory)["events"] < left


@pytest.mark.skipif(FAKETIME is None, reason="faketime is not installed (./commands test installs it)")
def test_cut_offs_are_the_databases_clock_and_purge_by_hand_prints_counts(
    committed_factory: SessionFactory, database_url: str
) -> None:
    """A purge run by hand (`./commands purge`) from a process whose clock is 100 days ahead purges what the
    database's clock says is old, and nothing that is young by that clock (though old by the process's)."""
    with committed_factory() as session:
        now = database_now(session)
        session.add_all(
            [Event(kind="young", actor="t", created_at=now - timedelta(days=2), detail={})]
            + [Event(kind="old", actor="t", created_at=now - timedelta(days=31), detail={}) for _ in range(3)]
        )
        session.commit()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRACTAL_")}
    env.update(
        DATABASE_URL=database_url,
        FRACTAL_ENV="test",
        FRACTAL_RETENTION_DAYS="30",
        FRACTAL_RETENTION_DELETE_LOG_OBJECTS="false",
        FRACTAL_LOG_LEVEL="WARNING",
        # The wall clock is what is skewed; a skewed monotonic clock hangs the interpreter's exit under libfaketime.
        DONT_FAKE_MONOTONIC="1",
    )
    assert FAKETIME is not None
    done = subprocess.run(
        [FAKETIME, "-f", "+100d", str(ROOT / ".venv" / "bin" / "flask"), "--app", "admin_app", "purge"]
        if (ROOT / ".venv" / "bin" / "flask").exists()
        else [FAKETIME, "-f", "+100d", sys.executable, "-m", "flask", "--app", "admin_app", "purge"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"purged"')))
    assert printed["purged"]["events"] == 3 and printed["complete"] is True
    with committed_factory() as session:
        assert list(session.scalars(select(Event.kind))) == ["young"]


def test_the_purge_works_on_sqlite_too(tmp_path: Path, settings: Settings) -> None:
    """The embedded default (`./commands run`) purges with the same statements, minus the row locks."""
    url = f"sqlite:///{tmp_path}/fractal.db"
    run_alembic(url, command.upgrade, "head")
    engine = create_engine(url)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    try:
        with factory() as session:
            now = database_now(session)
            f = Factories(session)
            _image(f)
            host, _ = f.instance(instance_name="gone", status=InstanceStatus.TERMINATED, status_changed_at=now - OLD)
            session.add_all([_box(host.instance_name, ended=now - OLD, created=now - OLD) for _ in range(5)])
            session.add(_box(host.instance_name, ended=now - YOUNG, created=now - OLD))
            session.add_all([Event(kind="old", actor="t", created_at=now - OLD, detail={}) for _ in range(5)])
            session.add(
                IdempotencyKey(
                    user_id="u",
                    key="k",
                    request_hash="h",
                    response_status=201,
                    response_body={},
                    expires_at=now - timedelta(days=3),
                )
            )
            session.commit()
        with factory() as session:
            report = purge_history(session, settings=_settings(settings, database_url=url), batch_size=2)
        assert report.errors == []
        assert report.purged == {
            "idempotency_keys": 1,
            "events": 5,
            "log_uploads": 0,
            "mandelboxes": 5,
            "heartbeats": 0,
            "instances": 0,
        }
        with factory() as session:  # the young box keeps its instance
            assert list(session.scalars(select(Instance.instance_name))) == ["gone"]
    finally:
        engine.dispose()


def test_a_purge_stops_at_once_when_its_lease_is_lost(
    committed_factory: SessionFactory, settings: Settings, engine: Engine
) -> None:
    """The scaler passes "my lease still holds" as ``should_continue``: once it says no, not one more batch."""
    _seed_bulk_history(engine, events=1_000, boxes=0)
    asked: list[int] = []

    def lease_holds() -> bool:
        asked.append(1)
        return len(asked) <= 3  # three batches, then the lease is gone

    with committed_factory() as session:
        report = purge_history(
            session, settings=_settings(settings, purge_pause_ms=0), batch_size=100, should_continue=lease_holds
        )
    assert not report.complete
    # One batch of idempotency keys (none), then two of events: 200 rows, not one more.
    assert report.purged["events"] == 200 and report.batches == 3
    assert _counts(committed_factory)["events"] == 800
