"""A small typed client for Fractal's public and admin APIs (what the ``fractal`` command and the notebook use).

    from fractal.client import AdminClient
    admin = AdminClient("http://127.0.0.1:8001", credential=os.environ["FRACTAL_API_KEY"])
    for row in admin.capacity():
        print(row.region, row.client_commit_hash, row.free, "/", row.target_free)

- Every failure the API answers is raised as :class:`ApiError` carrying the contract's ``error`` code, its message,
  the HTTP status and ``details``; a server that cannot be reached (refused, timed out, not speaking HTTP) is
  :class:`UnreachableError`.
- A 503 carrying ``Retry-After`` (``DATABASE_BUSY``, ``DATABASE_UNAVAILABLE``, ``NO_INSTANCE_AVAILABLE``) is retried
  after the advised wait, at most ``max_retries`` times and never waiting longer than ``max_retry_wait_s`` at once;
  the API promises such an answer stored nothing, so retrying a write is safe (an assign with an
  ``idempotency_key`` even more so).
- Lists follow ``next_cursor`` to the end (``iter_*`` yields row by row, the plain methods return every row).
- Answers become frozen dataclasses; timestamps become aware UTC datetimes; fields the client does not know yet are
  ignored, so a newer server does not break an older client.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, get_type_hints
from urllib.parse import quote

import requests

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_RETRIES = 3
DEFAULT_MAX_RETRY_WAIT_S = 30.0

T = TypeVar("T")


class ClientError(Exception):
    """Base of everything this client raises."""


class UnreachableError(ClientError):
    """The API could not be reached: connection refused, DNS, timeout, or an answer that is not HTTP."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach {url}: {reason}")


class ApiError(ClientError):
    """An error answer of the API: ``status`` (HTTP), ``code`` (the contract's ``error``), ``message``, ``details``."""

    def __init__(
        self,
        *,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        retry_after_s: float | None = None,
        method: str = "",
        path: str = "",
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after_s = retry_after_s
        self.method = method
        self.path = path
        super().__init__(f"{status} {code}: {message}")


def _parse_time(value: Any) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _build(cls: type[T], data: dict[str, Any]) -> T:
    """A dataclass from an answer: known fields only; fields typed datetime parsed from RFC 3339."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = get_type_hints(cls)
    values: dict[str, Any] = {}
    for item in dataclasses.fields(cls):  # type: ignore[arg-type]
        if item.name not in data:
            continue
        raw = data[item.name]
        values[item.name] = _parse_time(raw) if "datetime" in str(hints[item.name]) else raw
    return cls(**values)


@dataclass(frozen=True)
class Image:
    region: str
    client_commit_hash: str
    ami_id: str
    active: bool
    instance_type: str
    mandelbox_capacity: int
    target_free: int | None = None
    buffer_policy: dict[str, Any] | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class Instance:
    instance_name: str
    region: str
    client_commit_hash: str
    status: str
    mandelbox_capacity: int
    live_mandelboxes: int
    ip: str | None = None
    ami_id: str | None = None
    instance_type: str | None = None
    cloud_provider_id: str | None = None
    last_heartbeat_at: datetime | None = None
    created_at: datetime | None = None
    status_changed_at: datetime | None = None


@dataclass(frozen=True)
class RegisteredInstance:
    instance_name: str
    status: str
    host_secret: str = field(repr=False)


@dataclass(frozen=True)
class Capacity:
    region: str
    client_commit_hash: str
    active: bool
    instances: dict[str, int]
    capacity: int
    used: int
    free: int
    target_free: int
    live_mandelboxes: int = 0
    target_reason: str | None = None  # static, demand, floor, ceiling or schedule: why target_free is what it is
    target_detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Mandelbox:
    mandelbox_id: str
    instance_name: str
    region: str
    status: str
    ip: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    created_at: datetime | None = None
    ended_at: datetime | None = None
    end_reason: str | None = None


@dataclass(frozen=True)
class Event:
    id: int
    kind: str
    actor: str
    created_at: datetime | None = None
    instance_name: str | None = None
    mandelbox_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    scopes: list[str]
    created_by: str
    created_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


@dataclass(frozen=True)
class CreatedApiKey:
    api_key: ApiKey
    key: str = field(repr=False)


@dataclass(frozen=True)
class ReconcileReport:
    ran: bool
    skipped_reason: str | None = None
    started_at: datetime | None = None
    duration_s: float = 0.0
    actions: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    region_errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Assignment:
    mandelbox_id: str
    ip: str
    region: str
    instance_name: str
    status: str


class _Transport:
    """One HTTP session against one API: credentials, timeouts, error mapping, 503 retries."""

    def __init__(
        self,
        base_url: str,
        credential: str | None,
        *,
        timeout_s: float,
        max_retries: int,
        max_retry_wait_s: float,
        session: requests.Session | None,
        sleep: Callable[[float], None],
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s
        self.sleep = sleep
        self.http = session or requests.Session()
        self.headers = {"Accept": "application/json", "User-Agent": "fractal-client"}
        if credential:
            self.headers["Authorization"] = f"Bearer {credential}"

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """The JSON body of a 2xx answer (None when empty); raises ApiError or UnreachableError."""
        url = self.base_url + path
        query = {key: value for key, value in (params or {}).items() if value is not None}
        attempt = 0
        while True:
            try:
                response = self.http.request(
                    method,
                    url,
                    params=query,
                    json=json,
                    headers={**self.headers, **(headers or {})},
                    timeout=self.timeout_s,
                    allow_redirects=False,
                )
            except requests.RequestException as exc:
                raise UnreachableError(self.base_url, _reason(exc)) from exc
            if response.status_code < 400:
                return _json_or_none(response)
            error = _api_error(response, method, path)
            if error.status == 503 and error.retry_after_s is not None and attempt < self.max_retries:
                attempt += 1
                self.sleep(min(error.retry_after_s, self.max_retry_wait_s))
                continue
            raise error

    def pages(self, path: str, key: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Every row of an admin list, following ``next_cursor``."""
        cursor: str | None = None
        while True:
            body = self.request("GET", path, params={**params, "cursor": cursor})
            yield from body[key]
            cursor = body.get("next_cursor")
            if not cursor:
                return


def _reason(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed (is the server running and the URL right?)"
    return type(exc).__name__


def _json_or_none(response: requests.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _api_error(response: requests.Response, method: str, path: str) -> ApiError:
    body = _json_or_none(response)
    retry_after: float | None = None
    header = response.headers.get("Retry-After")
    if header is not None:
        try:
            retry_after = max(0.0, float(header))
        except ValueError:
            retry_after = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return ApiError(
            status=response.status_code,
            code=body["error"],
            message=str(body.get("message", "")),
            details=body.get("details"),
            retry_after_s=retry_after,
            method=method,
            path=path,
        )
    # Not the contract's shape: a proxy or something else answered.
    return ApiError(
        status=response.status_code,
        code="HTTP_ERROR",
        message=(response.text or response.reason or "")[:200].strip(),
        retry_after_s=retry_after,
        method=method,
        path=path,
    )


class _Client:
    def __init__(
        self,
        base_url: str,
        credential: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_retry_wait_s: float = DEFAULT_MAX_RETRY_WAIT_S,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.transport = _Transport(
            base_url,
            credential,
            timeout_s=timeout_s,
            max_retries=max_retries,
            max_retry_wait_s=max_retry_wait_s,
            session=session,
            sleep=sleep,
        )

    @property
    def base_url(self) -> str:
        return self.transport.base_url

    def ready(self) -> dict[str, Any]:
        """``/readyz``'s checks; raises ApiError (503) when a dependency is down."""
        body: dict[str, Any] = self.transport.request("GET", "/readyz")
        return body


def _segment(value: str) -> str:
    return quote(value, safe="")


class AdminClient(_Client):
    """The admin API, with an admin token or an API key (``fk_…``) as ``credential``."""

    # images
    def iter_images(self, *, page_size: int = 500) -> Iterator[Image]:
        for row in self.transport.pages("/admin/images", "images", {"limit": page_size}):
            yield _build(Image, row)

    def images(self) -> list[Image]:
        return list(self.iter_images())

    def put_image(
        self,
        region: str,
        client_commit_hash: str,
        *,
        ami_id: str,
        instance_type: str,
        mandelbox_capacity: int,
        active: bool = True,
        target_free: int | None = None,
        buffer_policy: Mapping[str, Any] | None = None,
    ) -> Image:
        """Create or update (publish, deactivate) the image of a client version in a region. A PUT sets the whole
        image: a ``target_free`` or ``buffer_policy`` left out is cleared (static, the fleet's default)."""
        body = {
            "ami_id": ami_id,
            "active": active,
            "instance_type": instance_type,
            "mandelbox_capacity": mandelbox_capacity,
            **({"target_free": target_free} if target_free is not None else {}),
            **({"buffer_policy": dict(buffer_policy)} if buffer_policy is not None else {}),
        }
        path = f"/admin/images/{_segment(region)}/{_segment(client_commit_hash)}"
        return _build(Image, self.transport.request("PUT", path, json=body))

    # instances
    def iter_instances(
        self, *, region: str | None = None, status: str | None = None, page_size: int = 500
    ) -> Iterator[Instance]:
        params = {"region": region, "status": status, "limit": page_size}
        for row in self.transport.pages("/admin/instances", "instances", params):
            yield _build(Instance, row)

    def instances(self, *, region: str | None = None, status: str | None = None) -> list[Instance]:
        return list(self.iter_instances(region=region, status=status))

    def instance(self, instance_name: str) -> Instance | None:
        """One instance by name (from the list; the API has no single-instance read), or None."""
        return next((item for item in self.iter_instances() if item.instance_name == instance_name), None)

    def register_instance(
        self,
        instance_name: str,
        *,
        region: str,
        client_commit_hash: str,
        mandelbox_capacity: int,
        ami_id: str | None = None,
        instance_type: str | None = None,
        cloud_provider_id: str | None = None,
    ) -> RegisteredInstance:
        body = {
            "instance_name": instance_name,
            "region": region,
            "client_commit_hash": client_commit_hash,
            "mandelbox_capacity": mandelbox_capacity,
            "ami_id": ami_id,
            "instance_type": instance_type,
            "cloud_provider_id": cloud_provider_id,
        }
        answer = self.transport.request(
            "POST", "/admin/instances", json={key: value for key, value in body.items() if value is not None}
        )
        return _build(RegisteredInstance, answer)

    def drain(self, instance_name: str) -> Instance:
        return _build(Instance, self.transport.request("POST", f"/admin/instances/{_segment(instance_name)}/drain"))

    # mandelboxes, capacity, events, the scaler
    def iter_mandelboxes(
        self,
        *,
        user_id: str | None = None,
        status: str | None = None,
        instance_name: str | None = None,
        page_size: int = 500,
    ) -> Iterator[Mandelbox]:
        params = {"user_id": user_id, "status": status, "instance_name": instance_name, "limit": page_size}
        for row in self.transport.pages("/admin/mandelboxes", "mandelboxes", params):
            yield _build(Mandelbox, row)

    def mandelboxes(
        self, *, user_id: str | None = None, status: str | None = None, instance_name: str | None = None
    ) -> list[Mandelbox]:
        return list(self.iter_mandelboxes(user_id=user_id, status=status, instance_name=instance_name))

    def capacity(self) -> list[Capacity]:
        body = self.transport.request("GET", "/admin/capacity")
        return [_build(Capacity, row) for row in body["capacity"]]

    def iter_events(
        self,
        *,
        page_size: int = 100,
        kinds: Sequence[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[Event]:
        """The audit log, newest first, to its beginning or to ``since`` (stop iterating when you have seen
        enough); only ``kinds`` when given, only events written before ``until`` when given."""
        params: dict[str, Any] = {"limit": page_size}
        if kinds:
            params["kind"] = ",".join(kinds)
        if since is not None:
            params["since"] = since.isoformat()
        if until is not None:
            params["until"] = until.isoformat()
        for row in self.transport.pages("/admin/events", "events", params):
            yield _build(Event, row)

    def events(self, *, limit: int = 100) -> list[Event]:
        """The newest ``limit`` events, newest first (as many pages as that takes)."""
        result: list[Event] = []
        for event in self.iter_events(page_size=min(max(limit, 1), 1000)):
            if len(result) >= limit:
                break
            result.append(event)
        return result

    def events_after(self, event_id: int) -> list[Event]:
        """Events newer than ``event_id``, oldest first (what ``fractal events --follow`` prints each poll)."""
        newer: list[Event] = []
        for event in self.iter_events(page_size=200):
            if event.id <= event_id:
                break
            newer.append(event)
        return list(reversed(newer))

    def reconcile(self) -> ReconcileReport:
        return _build(ReconcileReport, self.transport.request("POST", "/admin/scaling/reconcile"))

    # API keys
    def create_api_key(self, name: str, scopes: list[str], *, expires_at: datetime | None = None) -> CreatedApiKey:
        body: dict[str, Any] = {"name": name, "scopes": scopes}
        if expires_at is not None:
            body["expires_at"] = expires_at.isoformat()
        answer = self.transport.request("POST", "/admin/api-keys", json=body)
        return CreatedApiKey(api_key=_build(ApiKey, answer), key=answer["key"])

    def iter_api_keys(self, *, page_size: int = 500) -> Iterator[ApiKey]:
        for row in self.transport.pages("/admin/api-keys", "api_keys", {"limit": page_size}):
            yield _build(ApiKey, row)

    def api_keys(self) -> list[ApiKey]:
        return list(self.iter_api_keys())

    def revoke_api_key(self, key_id: str) -> ApiKey:
        return _build(ApiKey, self.transport.request("DELETE", f"/admin/api-keys/{_segment(key_id)}"))


class PublicClient(_Client):
    """The public API, with a user token as ``credential``."""

    def regions(self) -> list[str]:
        regions: list[str] = self.transport.request("GET", "/regions")["regions"]
        return regions

    def assign(
        self,
        regions: list[str],
        client_commit_hash: str,
        *,
        session_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Assignment:
        """A mandelbox; retried on 503 under one ``Idempotency-Key`` (a fresh one unless given), so a retry can
        never give the user a second mandelbox."""
        body: dict[str, Any] = {"regions": regions, "client_commit_hash": client_commit_hash}
        if session_id is not None:
            body["session_id"] = session_id
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return _build(Assignment, self.transport.request("POST", "/mandelbox/assign", json=body, headers=headers))

    def mandelbox(self, mandelbox_id: str) -> Mandelbox:
        return _build(Mandelbox, self.transport.request("GET", f"/mandelbox/{_segment(mandelbox_id)}"))

    def delete_mandelbox(self, mandelbox_id: str) -> Mandelbox:
        return _build(Mandelbox, self.transport.request("DELETE", f"/mandelbox/{_segment(mandelbox_id)}"))
