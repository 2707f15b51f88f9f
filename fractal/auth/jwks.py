"""The issuer's signing keys from its JWKS endpoint: rotation without 401s, removal honoured, bounded waits.

Rules (issue 18):
- The key set is trusted for ``lifetime_s`` after a successful fetch; past that the next lookup refetches, so a key
  the issuer removed stops verifying tokens within the lifetime (PyJWKClient kept every key it had seen forever).
- A ``kid`` not in the set refetches at once, unless a fetch was attempted within ``cooldown_s``: a rotation costs
  no 401s (beyond that window after a fetch), while a flood of made-up kids costs one fetch per cooldown. A kid still
  unknown after that is a plain miss (401 for the caller).
- One fetch in flight per process. A caller that holds a usable (if stale) key never waits for another's fetch; one
  that needs the fetch waits for it at most ``timeout_s`` plus a little.
- A failed fetch is remembered for ``cooldown_s`` (the negative cache): callers in that window fail fast instead of
  each waiting on a dead endpoint in turn. While the endpoint is down, the last fetched set stays in use: no removal
  can be learnt from an endpoint that does not answer, and failing every token would turn an issuer outage into ours.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import structlog
from jwt import PyJWK, PyJWKError

log = structlog.get_logger(__name__)

# A JWKS is a few kilobytes; refuse to buffer an endpoint's mistake.
MAX_JWKS_BYTES = 1024 * 1024


class JwksKeyNotFoundError(LookupError):
    """The token's kid is not in the issuer's current key set (or the set could not be fetched)."""


class JwksKeySet:
    """Signing keys by kid, fetched from ``url`` as the module docstring describes. Thread-safe."""

    def __init__(
        self,
        url: str,
        *,
        lifetime_s: float = 600,
        cooldown_s: float = 5,
        timeout_s: float = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._lifetime_s = lifetime_s
        self._cooldown_s = cooldown_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._keys: dict[str, Any] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last fetch, successful or not
        self._fetch_lock = threading.Lock()
        # Bumped whenever a fetch removes or replaces a key: callers caching verification results drop them.
        self.generation = 0
        self.fetches = 0

    def fresh(self) -> bool:
        """True while the last fetched set is within its lifetime (what it says may be relied on without asking)."""
        return self._fetched_at is not None and self._clock() - self._fetched_at < self._lifetime_s

    def key(self, kid: str) -> Any:
        """The verification key for ``kid``, refetching the set when the rules allow; JwksKeyNotFoundError if none."""
        if self.fresh() and kid in self._keys:
            return self._keys[kid]
        self._refresh(wait=kid not in self._keys)
        key = self._keys.get(kid)
        if key is None:
            raise JwksKeyNotFoundError(kid)
        return key

    def _refresh(self, *, wait: bool) -> None:
        acquired = self._fetch_lock.acquire(timeout=self._timeout_s + 1) if wait else self._fetch_lock.acquire(False)
        if not acquired:
            return  # another thread's fetch is in flight: use what we have (or miss, after a bounded wait)
        try:
            now = self._clock()
            if self._attempted_at is not None and now - self._attempted_at < self._cooldown_s:
                return  # a fetch ran moments ago (perhaps the one we waited for): its outcome stands
            self._attempted_at = now
            try:
                fetched = self._fetch()
                entries = {kid: entry for kid, (_key, entry) in fetched.items()}
            except Exception as error:  # any failure of the endpoint: remembered for the cooldown
                log.warning("jwks.fetch_failed", url=self._url, error_type=type(error).__name__)
                return
            # A removed or replaced key invalidates what was verified with it; an added one invalidates nothing.
            changed = any(entries.get(kid) != entry for kid, entry in self._entries.items())
            self._keys = {kid: key for kid, (key, _entry) in fetched.items()}
            self._entries = entries
            self._fetched_at = self._clock()
            if changed:
                self.generation += 1
            log.info("jwks.fetched", url=self._url, kids=sorted(entries), changed=changed)
        finally:
            self._fetch_lock.release()

    def _fetch(self) -> dict[str, tuple[Any, dict[str, Any]]]:
        """kid → (verification key, the JWK as published) for every usable RS256 signing key at the endpoint."""
        self.fetches += 1
        request = urllib.request.Request(self._url, headers={"Accept": "application/json"})  # noqa: S310 (configured)
        with urllib.request.urlopen(request, timeout=self._timeout_s) as response:  # noqa: S310
            body = response.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError("JWKS too large")
        document = json.loads(body)
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError("not a JWKS document")
        keys: dict[str, tuple[Any, dict[str, Any]]] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or entry.get("kty") != "RSA":
                continue
            kid = entry.get("kid")
            if not isinstance(kid, str) or not kid:
                continue
            try:
                keys[kid] = (PyJWK(entry, algorithm="RS256").key, entry)
            except PyJWKError:
                continue  # a key we cannot use is as good as absent
        return keys
