"""The heartbeat's lean path (issue 15): the hand check of its body accepts nothing HeartbeatIn refuses and reads
the same values; the answer has HeartbeatOut's shape; on the engine the apps build for themselves (its statement on
a pooled DBAPI connection), a replaced or TERMINATED secret is refused at once with nothing written, the
transaction bounds still hold and database failures get the usual answers."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import Engine, select, text, update

from fractal.auth.hosts import hash_host_secret
from fractal.blueprints import HOST_BLUEPRINTS
from fractal.config import Settings
from fractal.database import SessionFactory, create_session_factory
from fractal.factory import create_app
from fractal.fleet.instances import move_instances
from fractal.host_service.schemas import (
    MAX_METRICS_BYTES,
    HeartbeatIn,
    HeartbeatOut,
    HeartbeatReport,
    accept_heartbeat,
)
from fractal.models import Heartbeat, Instance, InstanceStatus, MandelboxStatus
from test.factories import Factories

STATUSES = [str(status) for status in MandelboxStatus]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def model_report(data: Any) -> HeartbeatReport | None:
    try:
        return HeartbeatReport.of(HeartbeatIn.model_validate({} if data is None else data))
    except ValidationError:
        return None


# Bodies near the one hosts send, and the ways they go wrong: ids in every spelling, statuses in other cases or
# types, names at and past their bounds, NUL characters, metrics near the size caps, missing and null fields.
uuid_texts = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.uuids().map(lambda u: "urn:uuid:" + str(u)),
    st.uuids().map(lambda u: str(u)[:8] + "_" + str(u)[9:]),
    st.uuids().map(lambda u: " " + str(u)[1:]),
    st.uuids().map(lambda u: u.hex[:4] + "-" + u.hex[4:] + "---"),
    st.text(alphabet="0123456789abcdefABCDEF-_ {}+\x00", min_size=30, max_size=40),
)
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
statuses = st.one_of(
    st.sampled_from(STATUSES), st.sampled_from([s.lower() for s in STATUSES] + ["", "RUNNING "]), any_json
)
boxes = st.one_of(
    st.fixed_dictionaries({"mandelbox_id": uuid_texts, "status": statuses}),
    st.fixed_dictionaries({"mandelbox_id": uuid_texts, "status": statuses, "extra": any_json}),
    st.fixed_dictionaries({"mandelbox_id": uuid_texts}),
    any_json,
)
names = st.one_of(
    st.text(min_size=1, max_size=12),
    st.text(min_size=126, max_size=130),
    st.just(""),
    st.just("host\x00"),
    any_json,
)
metrics = st.one_of(
    st.dictionaries(st.text(max_size=8), any_json, max_size=6),
    st.dictionaries(st.text(min_size=1, max_size=3), st.integers(), min_size=126, max_size=130),
    st.integers(min_value=MAX_METRICS_BYTES - 40, max_value=MAX_METRICS_BYTES + 40).map(lambda n: {"b": "x" * n}),
    st.just({"k": "nul\x00"}),
    st.just({"nul\x00": 1}),
    any_json,
)
bodies = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"instance_name": names, "mandelboxes": st.lists(boxes, max_size=4) | any_json, "metrics": metrics}
    ),
    any_json,
)
VALID = {
    "instance_name": "host-1",
    "mandelboxes": [{"mandelbox_id": str(uuid.UUID(int=1)), "status": "RUNNING"}],
    "metrics": {"cpu_percent": 12.5},
}


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(bodies)
@example(VALID)
@example({"instance_name": "h", "mandelboxes": [{"mandelbox_id": str(uuid.UUID(int=0)), "status": "EXITED"}]})
@example({"instance_name": "h", "mandelboxes": [{"mandelbox_id": str(uuid.uuid4()).upper(), "status": "DYING"}]})
@example({"instance_name": "h" * 128})
@example({"instance_name": "h", "mandelboxes": [{"mandelbox_id": str(uuid.uuid4()), "status": "RUNNING"}] * 2049})
@example({"instance_name": "h", "metrics": {str(k): k for k in range(129)}})
def test_the_hand_check_accepts_only_what_the_model_accepts_with_the_same_values(data: Any) -> None:
    fast = accept_heartbeat(data)
    if fast is not None:
        assert fast == model_report(data)


def test_the_hand_check_accepts_the_bodies_hosts_send() -> None:
    # Not vacuous: the common bodies take the lean path.
    assert accept_heartbeat(VALID) == model_report(VALID)
    assert accept_heartbeat({"instance_name": "host-1"}) == HeartbeatReport("host-1", [], {})
    upper = {"instance_name": "h", "mandelboxes": [{"mandelbox_id": str(uuid.UUID(int=7)).upper(), "status": "DYING"}]}
    assert accept_heartbeat(upper) == HeartbeatReport("h", [(uuid.UUID(int=7), MandelboxStatus.DYING)], {})


def test_bad_bodies_get_the_models_answers(host_client: Any, factories: Factories) -> None:
    instance, secret = factories.instance(status=InstanceStatus.ACTIVE)
    name = instance.instance_name
    cases = [
        {"instance_name": name, "mandelboxes": [{"mandelbox_id": "not-a-uuid", "status": "RUNNING"}]},
        {"instance_name": name, "mandelboxes": [{"mandelbox_id": str(uuid.uuid4()), "status": "running"}]},
        {"instance_name": name, "metrics": {"k": "\x00"}},
        {"instance_name": 7},
        {"mandelboxes": []},
    ]
    for body in cases:
        response = host_client.post("/host/heartbeat", json=body, headers=bearer(secret))
        assert response.status_code == 400, (body, response.json)
        assert response.json["error"] == "VALIDATION_ERROR" and "json" in response.json["details"]
    # A body the hand check leaves to the model but the model accepts (a hyphenless id) works as before.
    hyphenless = {"instance_name": name, "mandelboxes": [{"mandelbox_id": uuid.uuid4().hex, "status": "RUNNING"}]}
    assert accept_heartbeat(hyphenless) is None
    assert host_client.post("/host/heartbeat", json=hyphenless, headers=bearer(secret)).status_code == 200
    not_json = host_client.post(
        "/host/heartbeat", data=b"{", headers={**bearer(secret), "Content-Type": "application/json"}
    )
    assert not_json.status_code == 400 and not_json.json["error"] == "VALIDATION_ERROR"


def test_the_answer_has_heartbeat_outs_shape(host_client: Any, factories: Factories) -> None:
    instance, secret = factories.instance(status=InstanceStatus.DRAINING)
    gone = uuid.uuid4()
    body = {"instance_name": instance.instance_name, "mandelboxes": [{"mandelbox_id": str(gone), "status": "RUNNING"}]}
    response = host_client.post("/host/heartbeat", json=body, headers=bearer(secret))
    assert response.status_code == 200 and response.mimetype == "application/json"
    expected = HeartbeatOut(status=InstanceStatus.DRAINING, heartbeat_interval_s=10, stop_mandelboxes=[gone])
    assert response.json == expected.model_dump(mode="json")


# The engine the apps build for themselves: the heartbeat's statement runs on its pooled DBAPI connections.


@pytest.fixture
def app_client(bounded_settings: Settings, bounded_engine: Engine) -> Any:
    """The host app on the engine it would build for itself (conftest's bounded_engine)."""
    factory = create_session_factory(bounded_engine)
    return create_app(blueprints=HOST_BLUEPRINTS, settings=bounded_settings, session_factory=factory).test_client()


def _host(committed_factory: SessionFactory, status: InstanceStatus = InstanceStatus.ACTIVE) -> tuple[str, str]:
    with committed_factory() as session:
        instance, secret = Factories(session).instance(status=status)
        session.commit()
        return instance.instance_name, secret


def _metrics(committed_factory: SessionFactory, name: str) -> Any:
    with committed_factory() as session:
        return session.execute(select(Heartbeat.metrics).where(Heartbeat.instance_name == name)).scalar_one_or_none()


def test_on_the_apps_engine_a_replaced_or_terminated_secret_is_refused_at_once(
    app_client: Any, bounded_engine: Engine, committed_factory: SessionFactory
) -> None:
    name, secret = _host(committed_factory)
    client = app_client
    beat = {"instance_name": name, "mandelboxes": [], "metrics": {"n": 1}}
    assert client.post("/host/heartbeat", json=beat, headers=bearer(secret)).status_code == 200
    assert _metrics(committed_factory, name) == {"n": 1}

    with committed_factory() as session:
        session.execute(
            update(Instance).where(Instance.instance_name == name).values(host_secret_hash=hash_host_secret("new"))
        )
        session.commit()
    refused = client.post("/host/heartbeat", json={**beat, "metrics": {"n": 2}}, headers=bearer(secret))
    assert refused.status_code == 401 and (refused.json or {}).get("error") == "UNAUTHORIZED"
    assert _metrics(committed_factory, name) == {"n": 1}

    assert client.post("/host/heartbeat", json={**beat, "metrics": {"n": 3}}, headers=bearer("new")).status_code == 200
    with committed_factory() as session:
        for status in (InstanceStatus.DRAINING, InstanceStatus.TERMINATING, InstanceStatus.TERMINATED):
            move_instances(session, where=Instance.instance_name == name, to=status, actor="test", reason="t")
        session.commit()
    refused = client.post("/host/heartbeat", json={**beat, "metrics": {"n": 4}}, headers=bearer("new"))
    assert refused.status_code == 401
    assert _metrics(committed_factory, name) == {"n": 3}
    # Nothing was left open: every pooled connection went back idle, no transaction pending.
    with bounded_engine.connect() as connection:
        open_transactions = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'fractal' AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    assert open_transactions == 0


def test_on_the_apps_engine_the_bounds_hold_and_a_refused_heartbeat_writes_nothing(
    app_client: Any, bounded_engine: Engine, committed_factory: SessionFactory
) -> None:
    name, secret = _host(committed_factory)
    client = app_client
    beat = {"instance_name": name, "mandelboxes": [], "metrics": {"n": 1}}
    assert client.post("/host/heartbeat", json=beat, headers=bearer(secret)).status_code == 200

    with bounded_engine.connect() as holder:
        # Another transaction holds the heartbeats row (its own idle bound ends it within 20 s): without the bounds
        # the heartbeat would wait that long and then succeed, so this test fails rather than hangs.
        holder.exec_driver_sql("SET LOCAL idle_in_transaction_session_timeout = 20000")
        holder.execute(text("SELECT 1 FROM heartbeats WHERE instance_name = :n FOR UPDATE"), {"n": name}).all()
        done: dict[str, Any] = {}

        def beat_once() -> None:
            late = {**beat, "metrics": {"n": 2}}
            done["response"] = client.post("/host/heartbeat", json=late, headers=bearer(secret))

        worker = threading.Thread(target=beat_once)
        worker.start()
        worker.join(timeout=10)
        assert not worker.is_alive(), "the heartbeat waited past its lock bound"
        response = done["response"]
        assert response.status_code == 503, response.json
        assert response.json["error"] == "DATABASE_BUSY" and int(response.headers["Retry-After"]) >= 1
        holder.rollback()
    assert _metrics(committed_factory, name) == {"n": 1}
    assert client.post("/host/heartbeat", json={**beat, "metrics": {"n": 5}}, headers=bearer(secret)).status_code == 200
    assert _metrics(committed_factory, name) == {"n": 5}


def test_on_the_apps_engine_an_unreachable_database_is_database_unavailable(bounded_settings: Settings) -> None:
    closed = Settings(**{**bounded_settings.model_dump(), "database_url": "postgresql://postgres@127.0.0.1:9/none"})
    app = create_app(blueprints=HOST_BLUEPRINTS, settings=closed)
    secret = "remembered"
    # A secret remembered from before the outage: the route goes straight to its own statement.
    app.extensions["fractal"].host_secrets.remember(hash_host_secret(secret), "host-1")
    response = app.test_client().post(
        "/host/heartbeat", data=json.dumps({"instance_name": "host-1"}), headers=bearer(secret)
    )
    assert response.status_code == 503, response.get_data(as_text=True)
    assert (response.json or {}).get("error") == "DATABASE_UNAVAILABLE"


def test_on_the_apps_engine_its_settings_stay_in_its_transaction_and_a_dead_connection_is_replaced(
    app_client: Any, bounded_engine: Engine, committed_factory: SessionFactory
) -> None:
    name, secret = _host(committed_factory)
    beat = {"instance_name": name, "mandelboxes": [], "metrics": {"n": 1}}
    assert app_client.post("/host/heartbeat", json=beat, headers=bearer(secret)).status_code == 200
    # Every pooled connection: SET LOCAL only, so the next user of the one the heartbeat used gets the defaults.
    pooled = [bounded_engine.raw_connection() for _ in range(bounded_engine.pool.checkedin())]  # type: ignore[attr-defined]
    pids = []
    for raw in pooled:
        pids.append(raw.dbapi_connection.get_backend_pid())  # type: ignore[union-attr]
        raw.rollback()
        cursor = raw.cursor()
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone() == ("on",)
        cursor.close()
        raw.close()

    # They die (as in a database restart): the next heartbeat finds a dead one and still succeeds.
    with committed_factory() as session:
        for pid in pids:
            assert session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
        session.commit()
    for _ in range(100):
        with committed_factory() as session:
            alive = session.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"), {"pids": pids}
            ).scalar_one()
        if not alive:
            break
    response = app_client.post("/host/heartbeat", json={**beat, "metrics": {"n": 2}}, headers=bearer(secret))
    assert response.status_code == 200, response.json
    assert _metrics(committed_factory, name) == {"n": 2}


def test_the_migrated_heartbeat_function_is_the_statement_the_code_builds(engine: Engine) -> None:
    """fractal_heartbeat is created by a migration (frozen text): a change to the heartbeat's statements in
    fractal.host_service.service must come with a revision that replaces the function."""
    from fractal.host_service.service import HEARTBEAT_FUNCTION, heartbeat_function_body

    with engine.connect() as connection:
        body = connection.execute(
            text("SELECT prosrc FROM pg_proc WHERE proname = :name"), {"name": HEARTBEAT_FUNCTION}
        ).scalar_one()
    assert body == heartbeat_function_body()


def test_on_sqlite_the_portable_path_records_heartbeats_and_refuses_a_replaced_secret(
    tmp_path: Any, settings: Settings
) -> None:
    """SQLite has no fractal_heartbeat: the app's engine gets a session of its own for the portable statements."""
    from sqlalchemy.orm import Session

    from fractal.models import Base, Mandelbox

    sqlite_settings = Settings(**{**settings.model_dump(), "database_url": f"sqlite:///{tmp_path}/fractal.db"})
    app = create_app(blueprints=HOST_BLUEPRINTS, settings=sqlite_settings)
    engine = app.extensions["fractal"].engine
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        instance, secret = Factories(session).instance(status=InstanceStatus.ACTIVE)
        name = instance.instance_name
        dying = Mandelbox(mandelbox_id=uuid.uuid4(), instance_name=name, user_id="u", status=MandelboxStatus.DYING)
        session.add(dying)
        session.commit()
        dying_id = dying.mandelbox_id
    client = app.test_client()
    gone = uuid.uuid4()
    beat = {
        "instance_name": name,
        "mandelboxes": [{"mandelbox_id": str(gone), "status": "RUNNING"}],
        "metrics": {"n": 1},
    }
    answer = client.post("/host/heartbeat", json=beat, headers=bearer(secret))
    assert answer.status_code == 200, answer.json
    assert answer.json["status"] == "ACTIVE"
    assert sorted(answer.json["stop_mandelboxes"]) == sorted([str(gone), str(dying_id)])

    def stored_metrics() -> Any:
        with Session(engine) as session:
            return session.execute(select(Heartbeat.metrics).where(Heartbeat.instance_name == name)).scalar_one()

    assert stored_metrics() == {"n": 1}
    with Session(engine) as session:
        session.execute(
            update(Instance).where(Instance.instance_name == name).values(host_secret_hash=hash_host_secret("new"))
        )
        session.commit()
    refused = client.post("/host/heartbeat", json={**beat, "metrics": {"n": 2}}, headers=bearer(secret))
    assert refused.status_code == 401
    assert stored_metrics() == {"n": 1}
    engine.dispose()
