"""No input reaches a 500: hostile JWT claims, deeply nested or non-finite JSON, lone surrogates, oversized strings.

The named cases are the ones seen answering 500 (issue 18); the property tests feed generated claims and bodies to
every JSON route of the three apps and assert a 4xx (or a success), never a 5xx, and the one error shape.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fractal.auth.dev_keys import DevKeyPair
from fractal.json_limits import MAX_JSON_DEPTH, check_storable_strings, loads_limited
from fractal.models import Event, Heartbeat, Mandelbox
from test.factories import Factories
from test.servers import SmtpServer

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
ASSIGN = {"regions": ["us-east-1"], "client_commit_hash": "abc123"}


@pytest.fixture
def settings_overrides(smtp_server: SmtpServer) -> dict[str, Any]:
    return {"smtp_url": smtp_server.url, "newsletter_rate_limit": "100000 per minute"}


def sign(keypair: DevKeyPair, claims: dict[str, Any]) -> dict[str, str]:
    """A correctly signed RS256 token carrying exactly these claims (PyJWS: no claim checks on the way out)."""
    payload = json.dumps(claims).encode()
    token = jwt.api_jws.PyJWS().encode(payload, keypair.private_pem, algorithm="RS256")
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {"sub": "user-1", "iat": now, "exp": now + 600}
    values.update(overrides)
    return {key: value for key, value in values.items() if value is not ...}


def assert_shape(response: Any, status: int | None = None, code: str | None = None) -> None:
    assert response.status_code < 500, (response.status_code, response.get_data(as_text=True)[:500])
    if status is not None:
        assert response.status_code == status, response.get_data(as_text=True)[:500]
    if response.status_code >= 400:
        body = response.get_json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("message"), str)
        if code is not None:
            assert body["error"] == code


def rows(db: Session, model: Any) -> int:
    return int(db.execute(select(func.count()).select_from(model)).scalar_one())


@pytest.fixture
def region(factories: Factories) -> Iterator[None]:
    factories.image()
    factories.instance()
    yield


# --- the cases seen answering 500 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        claims(sub="user\x00one"),
        claims(sub="u" * 251),  # "user:" + sub no longer fits the 255-character actor column
        claims(sub="u" * 255),
        claims(sub="\ud800"),
        claims(sub=12345),
        claims(exp=str(int(time.time()) + 600)),  # PyJWT would accept a string exp
        claims(exp=True),
        claims(nbf="0"),
        claims(iat=[1]),
        claims(sub=...),
    ],
)
def test_unusable_claims_are_401_and_store_nothing(
    public_client: Any, keypair: DevKeyPair, db: Session, region: None, bad: dict[str, Any]
) -> None:
    for method, path in (("get", "/regions"), ("post", "/mandelbox/assign")):
        response = getattr(public_client, method)(path, json=ASSIGN, headers=sign(keypair, bad))
        assert_shape(response, 401, "UNAUTHORIZED")
    assert rows(db, Mandelbox) == 0 and rows(db, Event) == 0


def test_longest_usable_subject_fits_every_column(
    public_client: Any, admin_client: Any, keypair: DevKeyPair, region: None
) -> None:
    subject = "u" * 249  # "admin:" + 249 characters = 255
    assert_shape(public_client.post("/mandelbox/assign", json=ASSIGN, headers=sign(keypair, claims(sub=subject))), 201)
    admin = sign(keypair, claims(sub=subject, scope="admin"))
    response = admin_client.post(
        "/admin/instances",
        json={
            "instance_name": "i-long-actor",
            "region": "us-east-1",
            "client_commit_hash": "abc123",
            "mandelbox_capacity": 2,
        },
        headers=admin,
    )
    assert_shape(response, 201)


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 900, 5000])
def test_deep_json_is_400_everywhere(
    public_client: Any, host_client: Any, keypair: DevKeyPair, factories: Factories, depth: int
) -> None:
    _, secret = factories.instance()
    user = sign(keypair, claims())
    host = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    cases = [
        (public_client, "/mandelbox/assign", user, nested(depth)),
        (public_client, "/newsletter/subscribe", {"Content-Type": "application/json"}, nested(depth)),
        (public_client, "/newsletter/unsubscribe", {"Content-Type": "application/json"}, nested(depth)),
        (host_client, "/host/heartbeat", host, '{"instance_name": "x", "metrics": {"m": ' + nested(depth) + "}}"),
    ]
    for client, path, headers, body in cases:
        assert_shape(client.post(path, data=body, headers=headers), 400, "VALIDATION_ERROR")


def test_json_at_the_depth_limit_still_parses(public_client: Any, keypair: DevKeyPair, region: None) -> None:
    body = {"regions": ["us-east-1"], "client_commit_hash": "abc123", "extra": json.loads(nested(MAX_JSON_DEPTH - 1))}
    assert_shape(public_client.post("/mandelbox/assign", json=body, headers=sign(keypair, claims())), 201)


@pytest.mark.parametrize("metric", ["NaN", "Infinity", "-Infinity", "1e999", "1" * 40])
def test_non_finite_heartbeat_metrics_are_400(host_client: Any, factories: Factories, db: Session, metric: str) -> None:
    instance, secret = factories.instance()
    body = f'{{"instance_name": "{instance.instance_name}", "mandelboxes": [], "metrics": {{"cpu": {metric}}}}}'
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    assert_shape(host_client.post("/host/heartbeat", data=body, headers=headers), 400, "VALIDATION_ERROR")
    assert rows(db, Heartbeat) == 0


@pytest.mark.parametrize("token", ['"\\ud800"', '"\\udfff abc"', '"ok\\ud83d"'])
def test_lone_surrogates_are_400(public_client: Any, token: str) -> None:
    response = public_client.post(
        "/newsletter/unsubscribe", data='{"token": ' + token + "}", headers={"Content-Type": "application/json"}
    )
    assert_shape(response, 400, "VALIDATION_ERROR")


# --- properties ----------------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=300)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4),
    max_leaves=20,
)
claim_values = st.one_of(
    json_values,
    st.text(min_size=240, max_size=260),
    st.floats(),  # NaN and infinities too: json.dumps writes them
    st.integers(min_value=-(2**70), max_value=2**70),
)
# Subjects: any text, text around the column widths, text holding NUL or lone surrogates, and non-strings.
subjects = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="ab", min_size=245, max_size=260),
    st.builds(lambda a, b: a + "\x00" + b, st.text(max_size=5), st.text(max_size=5)),
    st.builds(lambda a, c: a + c, st.text(max_size=5), st.sampled_from(["\ud800", "\udfff", "\ud83d"])),
    claim_values,
)
now_ish = st.integers(min_value=int(time.time()) - 30, max_value=int(time.time()) + 600)
# Time claims: usually valid (so the subject gets looked at), else strings of numbers, booleans, NaN, anything.
times = st.one_of(now_ish, now_ish, now_ish.map(str), st.booleans(), st.floats(), claim_values)


@FUZZ
@given(
    sub=subjects,
    exp=times,
    nbf=st.one_of(st.just(...), st.just(...), times),
    iat=st.one_of(st.just(...), st.just(...), times),
    scope=st.one_of(st.just(...), st.just("admin"), claim_values),
    permissions=st.one_of(st.just(...), st.just(["admin"]), claim_values),
)
def test_any_claims_answer_below_500(
    public_client: Any,
    admin_client: Any,
    keypair: DevKeyPair,
    region: None,
    sub: Any,
    exp: Any,
    nbf: Any,
    iat: Any,
    scope: Any,
    permissions: Any,
) -> None:
    headers = sign(keypair, claims(sub=sub, exp=exp, nbf=nbf, iat=iat, scope=scope, permissions=permissions))
    assert_shape(public_client.get("/regions", headers=headers))
    assert_shape(public_client.post("/mandelbox/assign", json=ASSIGN, headers=headers))
    assert_shape(public_client.get(f"/mandelbox/{uuid.uuid4()}", headers=headers))
    assert_shape(admin_client.get("/admin/instances", headers=headers))


def _bodies() -> st.SearchStrategy[str]:
    """JSON documents, some shaped like the routes' bodies, plus hostile raw texts."""
    shaped = st.fixed_dictionaries(
        {},
        optional={
            "regions": json_values,
            "client_commit_hash": json_values,
            "session_id": json_values,
            "instance_name": json_values,
            "ip": json_values,
            "mandelbox_capacity": json_values,
            "mandelboxes": st.lists(
                st.fixed_dictionaries({}, optional={"mandelbox_id": json_values, "status": json_values}), max_size=3
            ),
            "metrics": json_values,
            "status": json_values,
            "email": json_values,
            "token": json_values,
            "ami_id": json_values,
            "active": json_values,
            "instance_type": json_values,
            "target_free": json_values,
            "region": json_values,
            "cloud_provider_id": json_values,
        },
    )
    documents = st.one_of(shaped, json_values).map(json.dumps)
    hostile = st.one_of(
        st.one_of(st.sampled_from([MAX_JSON_DEPTH + 1, 900, 1200, 5000]), st.integers(0, 3000)).map(nested),
        st.sampled_from([900, 1200, 5000]).map(lambda d: '{"instance_name": "x", "metrics": {"m": ' + nested(d) + "}}"),
        st.sampled_from(
            [
                '{"a": NaN}',
                '{"a": -Infinity}',
                '{"a": 1e400}',
                '"\\ud800"',
                '{"\\udc00": 1}',
                "{",
                "",
                '{"metrics": {"a": 1' + "0" * 5000 + "}}",
                "\x00",
                '{"status": "RUNNING"}' * 2,
            ]
        ),
        st.text(max_size=200),
    )
    return st.one_of(documents, hostile)


@pytest.fixture
def routes(
    public_client: Any, host_client: Any, admin_client: Any, keypair: DevKeyPair, factories: Factories
) -> list[tuple[Any, str, str, dict[str, str]]]:
    factories.image()
    _, secret = factories.instance()
    user = sign(keypair, claims())
    admin = sign(keypair, claims(sub="operator", scope="admin"))
    host = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    anonymous = {"Content-Type": "application/json"}
    box = uuid.uuid4()
    return [
        (public_client, "post", "/mandelbox/assign", user),
        (public_client, "post", "/newsletter/subscribe", anonymous),
        (public_client, "post", "/newsletter/unsubscribe", anonymous),
        (host_client, "post", "/host/handshake", host),
        (host_client, "post", "/host/heartbeat", host),
        (host_client, "put", f"/host/mandelboxes/{box}", host),
        (admin_client, "put", "/admin/images/us-east-1/abc123", admin),
        (admin_client, "post", "/admin/instances", admin),
    ]


@FUZZ
@given(body=_bodies(), index=st.integers(min_value=0, max_value=7))
def test_any_body_on_any_json_route_answers_below_500(
    routes: list[tuple[Any, str, str, dict[str, str]]], body: str, index: int
) -> None:
    client, method, path, headers = routes[index]
    assert_shape(getattr(client, method)(path, data=body.encode("utf-8", "surrogatepass"), headers=headers))


@pytest.mark.parametrize(
    "path", ["/mandelbox//x", "//regions", "/host//heartbeat", "/admin//instances", "/mandelbox/a//b/logs"]
)
def test_non_canonical_paths_are_json_404_never_a_redirect(
    public_client: Any, host_client: Any, admin_client: Any, path: str
) -> None:
    for client in (public_client, host_client, admin_client):
        response = client.get(path)
        # 404, or 405 where the merged path names a route of another method: JSON either way, no redirect.
        assert response.status_code in (404, 405) and "Location" not in response.headers
        assert_shape(response)


def _walked(raw: bytes) -> Any:
    """loads_limited as it was before its pre-check: every parsed string walked."""
    value = json.loads(raw)
    check_storable_strings(value)
    return value


# Text around surrogates: lone and paired code points, written raw or as \u escapes (either case), escaped
# backslashes before "ud800", in every encoding json.loads detects.
surrogate_texts = st.lists(
    st.one_of(
        st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010),
        st.sampled_from(["\\ud800", "\\uDBFF", "\\udc00", "\\uDFFF", "\\ud83d\\ude00", "\\\\ud800", "\\u00e9", "a"]),
    ),
    max_size=6,
).map("".join)


@settings(max_examples=600, deadline=None, derandomize=True)
@given(surrogate_texts, st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "utf-32-be"]))
def test_the_surrogate_pre_check_refuses_exactly_what_walking_every_string_refuses(text: str, encoding: str) -> None:
    raw = ('{"k": ["' + text.replace('"', "") + '"]}').encode(encoding, "surrogatepass")
    try:
        expected: Any = _walked(raw)
    except ValueError:
        expected = ValueError
    try:
        got: Any = loads_limited(raw)
    except ValueError:
        got = ValueError
    assert got == expected
