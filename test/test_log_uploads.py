"""Log uploads from hosts and clients, streamed to S3 on a moto server, listed with presigned URLs."""

from __future__ import annotations

import gzip
import os
import re
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from apiflask import APIFlask
from sqlalchemy import select
from sqlalchemy.orm import Session

from fractal.log_uploads import service
from fractal.models import LogSender, LogUpload, Mandelbox, MandelboxStatus
from test.factories import Factories

LIMIT = 2 * 1024 * 1024  # above the app-wide 1 MiB JSON limit, to prove log routes use their own


@pytest.fixture
def s3(aws_env: str) -> Any:
    return boto3.client("s3", endpoint_url=aws_env)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"logs-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def apps(make_app: Callable[..., APIFlask], bucket: str) -> dict[str, Any]:
    return {
        kind: make_app(kind, logs_bucket=bucket, max_log_bytes=LIMIT).test_client()
        for kind in ("public", "host", "admin")
    }


@pytest.fixture
def box(factories: Factories, db: Session) -> tuple[Mandelbox, str]:
    """A running mandelbox of user-1 on an instance; returns it and the instance's host secret."""
    instance, secret = factories.instance()
    mandelbox = Mandelbox(instance_name=instance.instance_name, user_id="user-1", status=MandelboxStatus.RUNNING)
    db.add(mandelbox)
    db.commit()
    return mandelbox, secret


def host_auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def stored_keys(s3: Any, bucket: str) -> list[str]:
    return [item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def rows(db: Session) -> list[LogUpload]:
    db.expire_all()
    return list(db.scalars(select(LogUpload).order_by(LogUpload.id)))


def nothing_written(s3: Any, bucket: str, db: Session) -> bool:
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return stored_keys(s3, bucket) == [] and rows(db) == [] and uploads == []


def log_bytes(size: int) -> bytes:
    line = b"2026-11-23T10:00:00Z protocol: frame sent ok\n"
    return (line * (size // len(line) + 1))[:size]


def test_host_uploads_a_log_larger_than_the_json_limit(
    apps: dict[str, Any], box: tuple[Mandelbox, str], s3: Any, bucket: str, db: Session
) -> None:
    mandelbox, secret = box
    body = log_bytes(1_500_000)

    response = apps["host"].put(
        f"/host/mandelboxes/{mandelbox.mandelbox_id}/logs", data=body, headers=host_auth(secret)
    )

    assert response.status_code == 201, response.get_json()
    key = response.get_json()["key"]
    assert re.fullmatch(rf"logs/\d{{4}}/\d{{2}}/\d{{2}}/{mandelbox.mandelbox_id}/host/\d{{6}}-[0-9a-f]{{32}}\.log", key)
    assert response.get_json()["size"] == len(body)
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    [row] = rows(db)
    assert (row.key, row.sender, row.size, row.mandelbox_id) == (key, LogSender.HOST, len(body), mandelbox.mandelbox_id)


def test_client_uploads_gzip_which_is_stored_decompressed_and_admin_downloads_both(
    apps: dict[str, Any],
    box: tuple[Mandelbox, str],
    user_headers: Callable[..., dict[str, str]],
    admin_headers: dict[str, str],
) -> None:
    mandelbox, secret = box
    host_log, client_log = log_bytes(5000), os.urandom(3000) + log_bytes(100_000)
    assert (
        apps["host"]
        .put(f"/host/mandelboxes/{mandelbox.mandelbox_id}/logs", data=host_log, headers=host_auth(secret))
        .status_code
        == 201
    )
    response = apps["public"].put(
        f"/mandelbox/{mandelbox.mandelbox_id}/logs",
        data=gzip.compress(client_log),
        headers={**user_headers("user-1"), "Content-Encoding": "gzip"},
    )
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["size"] == len(client_log)

    listing = apps["admin"].get(f"/admin/mandelboxes/{mandelbox.mandelbox_id}/logs", headers=admin_headers)

    assert listing.status_code == 200
    logs = listing.get_json()["logs"]
    assert [(entry["sender"], entry["size"]) for entry in logs] == [
        ("host", len(host_log)),
        ("client", len(client_log)),
    ]
    for entry, expected in zip(logs, (host_log, client_log), strict=True):
        assert "X-Amz-Expires=300" in entry["url"]
        with urllib.request.urlopen(entry["url"], timeout=10) as download:
            assert download.read() == expected


def test_multi_member_gzip_is_accepted(
    apps: dict[str, Any], box: tuple[Mandelbox, str], user_headers: Callable[..., dict[str, str]], s3: Any, bucket: str
) -> None:
    mandelbox, _secret = box
    body = gzip.compress(b"first part\n") + gzip.compress(b"second part\n")
    response = apps["public"].put(
        f"/mandelbox/{mandelbox.mandelbox_id}/logs",
        data=body,
        headers={**user_headers("user-1"), "Content-Encoding": "gzip"},
    )
    assert response.status_code == 201
    assert s3.get_object(Bucket=bucket, Key=response.get_json()["key"])["Body"].read() == b"first part\nsecond part\n"


def test_admin_listing_of_a_mandelbox_without_logs_is_empty_and_unknown_is_404(
    apps: dict[str, Any], box: tuple[Mandelbox, str], admin_headers: dict[str, str], user_headers: Any
) -> None:
    mandelbox, _secret = box
    empty = apps["admin"].get(f"/admin/mandelboxes/{mandelbox.mandelbox_id}/logs", headers=admin_headers)
    assert empty.status_code == 200 and empty.get_json() == {"logs": []}
    for unknown in (uuid.uuid4(), "not-a-uuid"):
        response = apps["admin"].get(f"/admin/mandelboxes/{unknown}/logs", headers=admin_headers)
        assert response.status_code == 404 and response.get_json()["error"] == "NOT_FOUND"
    forbidden = apps["admin"].get(f"/admin/mandelboxes/{mandelbox.mandelbox_id}/logs", headers=user_headers("user-1"))
    assert forbidden.status_code == 403


def test_another_users_mandelbox_is_404_and_nothing_is_written(
    apps: dict[str, Any], box: tuple[Mandelbox, str], user_headers: Any, s3: Any, bucket: str, db: Session
) -> None:
    mandelbox, _secret = box
    response = apps["public"].put(
        f"/mandelbox/{mandelbox.mandelbox_id}/logs", data=b"not yours", headers=user_headers("user-2")
    )
    assert response.status_code == 404
    assert response.get_json()["error"] == "NOT_FOUND"
    assert nothing_written(s3, bucket, db)


def test_another_hosts_mandelbox_and_unknown_ids_are_404(
    apps: dict[str, Any], box: tuple[Mandelbox, str], factories: Factories, s3: Any, bucket: str, db: Session
) -> None:
    mandelbox, _secret = box
    _other, other_secret = factories.instance()
    for target in (mandelbox.mandelbox_id, uuid.uuid4(), "not-a-uuid"):
        response = apps["host"].put(f"/host/mandelboxes/{target}/logs", data=b"log", headers=host_auth(other_secret))
        assert response.status_code == 404, target
        assert response.get_json()["error"] == "NOT_FOUND"
    assert nothing_written(s3, bucket, db)


def test_uploads_need_the_right_kind_of_credential(
    apps: dict[str, Any], box: tuple[Mandelbox, str], user_headers: Any, s3: Any, bucket: str, db: Session
) -> None:
    mandelbox, secret = box
    path = f"/mandelbox/{mandelbox.mandelbox_id}/logs"
    host_path = f"/host{path.replace('/mandelbox/', '/mandelboxes/')}"
    assert apps["public"].put(path, data=b"x").status_code == 401
    assert apps["public"].put(path, data=b"x", headers=host_auth(secret)).status_code == 401
    assert apps["host"].put(host_path, data=b"x").status_code == 401
    assert apps["host"].put(host_path, data=b"x", headers=user_headers("user-1")).status_code == 401
    assert apps["host"].put(host_path, data=b"x", headers=host_auth("forged-secret")).status_code == 401
    assert nothing_written(s3, bucket, db)


def test_the_limit_is_inclusive_and_one_byte_more_is_413(
    apps: dict[str, Any], box: tuple[Mandelbox, str], s3: Any, bucket: str, db: Session
) -> None:
    mandelbox, secret = box
    path = f"/host/mandelboxes/{mandelbox.mandelbox_id}/logs"
    too_big = apps["host"].put(path, data=log_bytes(LIMIT + 1), headers=host_auth(secret))
    assert too_big.status_code == 413
    assert too_big.get_json()["error"] == "PAYLOAD_TOO_LARGE"
    assert nothing_written(s3, bucket, db)
    exact = apps["host"].put(path, data=log_bytes(LIMIT), headers=host_auth(secret))
    assert exact.status_code == 201 and exact.get_json()["size"] == LIMIT


def test_a_gzip_bomb_stops_at_the_limit_and_leaves_nothing(
    apps: dict[str, Any], box: tuple[Mandelbox, str], user_headers: Any, s3: Any, bucket: str, db: Session
) -> None:
    mandelbox, _secret = box
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < LIMIT
    response = apps["public"].put(
        f"/mandelbox/{mandelbox.mandelbox_id}/logs",
        data=bomb,
        headers={**user_headers("user-1"), "Content-Encoding": "gzip"},
    )
    assert response.status_code == 413
    assert response.get_json()["error"] == "PAYLOAD_TOO_LARGE"
    assert nothing_written(s3, bucket, db)


def test_an_oversized_multipart_upload_is_aborted(
    make_app: Callable[..., APIFlask],
    box: tuple[Mandelbox, str],
    s3: Any,
    bucket: str,
    db: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 5 MiB parts (S3's minimum): two parts are uploaded before the 11 MiB limit is crossed mid-stream.
    monkeypatch.setattr(service, "PART_SIZE_BYTES", 5 * 1024 * 1024)
    host = make_app("host", logs_bucket=bucket, max_log_bytes=11 * 1024 * 1024).test_client()
    mandelbox, secret = box
    body = gzip.compress(log_bytes(12 * 1024 * 1024))
    response = host.put(
        f"/host/mandelboxes/{mandelbox.mandelbox_id}/logs",
        data=body,
        headers={**host_auth(secret), "Content-Encoding": "gzip"},
    )
    assert response.status_code == 413
    assert nothing_written(s3, bucket, db)  # no object, no row, no multipart upload left open


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", b"this is not gzip at all"),
        ("gzip", gzip.compress(log_bytes(10_000))[:-20]),  # truncated
        ("gzip", b""),
        ("br", b"whatever"),
    ],
)
def test_bad_encodings_are_400_and_leave_nothing(
    apps: dict[str, Any],
    box: tuple[Mandelbox, str],
    s3: Any,
    bucket: str,
    db: Session,
    encoding: str,
    body: bytes,
) -> None:
    mandelbox, secret = box
    response = apps["host"].put(
        f"/host/mandelboxes/{mandelbox.mandelbox_id}/logs",
        data=body,
        headers={**host_auth(secret), "Content-Encoding": encoding},
    )
    assert response.status_code == 400
    assert response.get_json()["error"] == "VALIDATION_ERROR"
    assert nothing_written(s3, bucket, db)


def test_missing_bucket_is_503_and_no_row(
    make_app: Callable[..., APIFlask], aws_env: str, box: tuple[Mandelbox, str], db: Session
) -> None:
    host = make_app("host", logs_bucket=f"absent-{uuid.uuid4().hex[:8]}").test_client()
    mandelbox, secret = box
    response = host.put(f"/host/mandelboxes/{mandelbox.mandelbox_id}/logs", data=b"log", headers=host_auth(secret))
    assert response.status_code == 503
    assert response.get_json()["error"] == "SERVICE_UNAVAILABLE"
    assert int(response.headers["Retry-After"]) >= 1
    assert rows(db) == []


def test_host_secret_and_log_content_stay_out_of_the_logs(
    make_app: Callable[..., APIFlask],
    bucket: str,
    box: tuple[Mandelbox, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    host = make_app("host", logs_bucket=bucket, max_log_bytes=LIMIT).test_client()
    mandelbox, secret = box
    path = f"/host/mandelboxes/{mandelbox.mandelbox_id}/logs"
    assert host.put(path, data=b"secret-protocol-line-XYZZY\n", headers=host_auth(secret)).status_code == 201
    assert host.put(path, data=log_bytes(LIMIT + 5), headers=host_auth(secret)).status_code == 413
    logged = capsys.readouterr().err
    assert '"event": "log_uploaded"' in logged
    assert secret not in logged
    assert "XYZZY" not in logged


def test_a_mandelbox_holds_at_most_its_count_quota(
    make_app: Callable[..., APIFlask], bucket: str, box: tuple[Mandelbox, str], s3: Any, db: Session
) -> None:
    host = make_app("host", logs_bucket=bucket, log_uploads_per_mandelbox=3).test_client()
    mandelbox, secret = box
    path = f"/host/mandelboxes/{mandelbox.mandelbox_id}/logs"
    codes = [host.put(path, data=b"log line\n", headers=host_auth(secret)).status_code for _ in range(5)]
    assert codes == [201, 201, 201, 429, 429]
    refused = host.put(path, data=b"log line\n", headers=host_auth(secret))
    assert refused.get_json()["error"] == "RATE_LIMITED"
    assert len(rows(db)) == 3 and len(stored_keys(s3, bucket)) == 3


def test_a_mandelbox_holds_at_most_its_byte_quota(
    make_app: Callable[..., APIFlask], bucket: str, box: tuple[Mandelbox, str], s3: Any, db: Session
) -> None:
    host = make_app("host", logs_bucket=bucket, max_log_bytes=1000, log_bytes_per_mandelbox=1500).test_client()
    mandelbox, secret = box
    path = f"/host/mandelboxes/{mandelbox.mandelbox_id}/logs"
    assert host.put(path, data=log_bytes(1000), headers=host_auth(secret)).status_code == 201
    # 600 bytes fit one log but not the 500 left of the quota: refused whole, nothing kept.
    over = host.put(path, data=log_bytes(600), headers=host_auth(secret))
    assert over.status_code == 429 and over.get_json()["error"] == "RATE_LIMITED"
    assert host.put(path, data=log_bytes(500), headers=host_auth(secret)).status_code == 201
    assert host.put(path, data=b"x", headers=host_auth(secret)).status_code == 429  # full
    assert sorted(row.size for row in rows(db)) == [500, 1000]
    assert len(stored_keys(s3, bucket)) == 2 and s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_uploads_are_rate_limited_per_sender(
    make_app: Callable[..., APIFlask], bucket: str, factories: Factories, db: Session, user_headers: Any
) -> None:
    instance, secret = factories.instance()
    boxes = []
    for user in ("user-1", "user-2"):
        mandelbox = Mandelbox(instance_name=instance.instance_name, user_id=user, status=MandelboxStatus.RUNNING)
        db.add(mandelbox)
        boxes.append(mandelbox)
    db.commit()
    overrides = {"logs_bucket": bucket, "log_upload_rate_limit": "2 per minute"}
    host = make_app("host", **overrides).test_client()
    public = make_app("public", **overrides).test_client()
    # One host spreading uploads over its mandelboxes: the limit is the sender's, not the mandelbox's.
    codes = [
        host.put(f"/host/mandelboxes/{box.mandelbox_id}/logs", data=b"l", headers=host_auth(secret)).status_code
        for box in (*boxes, boxes[0])
    ]
    assert codes == [201, 201, 429]
    refused = host.put(f"/host/mandelboxes/{boxes[1].mandelbox_id}/logs", data=b"l", headers=host_auth(secret))
    assert refused.get_json()["error"] == "RATE_LIMITED" and int(refused.headers["Retry-After"]) >= 1
    # A user has a budget of their own.
    path = f"/mandelbox/{boxes[0].mandelbox_id}/logs"
    assert [public.put(path, data=b"l", headers=user_headers("user-1")).status_code for _ in range(3)] == [
        201,
        201,
        429,
    ]
