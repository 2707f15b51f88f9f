"""Readiness checks: each dependency answered or not, never raising."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from fractal.database import SessionFactory


@dataclass(frozen=True)
class Readiness:
    checks: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(value in ("ok", "not configured") for value in self.checks.values())

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": "ready" if self.ready else "unavailable", "checks": self.checks}
        failing = [name for name, value in self.checks.items() if value not in ("ok", "not configured")]
        if failing:
            body["error"] = "SERVICE_UNAVAILABLE"
            body["message"] = "Unavailable: " + ", ".join(failing)
        return body


def check_readiness(session_factory: SessionFactory, *, redis_client: Any | None) -> Readiness:
    """Ping the database and (when configured) Redis."""
    checks: dict[str, str] = {}
    try:
        with session_factory() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception:  # any failure means "not ready"; the kind is not the caller's business
        checks["database"] = "unavailable"
    if redis_client is None:
        checks["redis"] = "not configured"
    else:
        try:
            redis_client.ping()
            checks["redis"] = "ok"
        except Exception:
            checks["redis"] = "unavailable"
    return Readiness(checks)
