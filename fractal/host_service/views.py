"""Host-service API: handshake, heartbeats and mandelbox status reports (host secret auth)."""

from __future__ import annotations

from apiflask import APIBlueprint

host_blueprint = APIBlueprint("host", __name__, tag="Host service", url_prefix="/host")
