"""`./commands run`: the whole stack in one process on the embedded defaults.

Migrates the database (a SQLite file unless DATABASE_URL is set), seeds a demo image in two regions when the
database is empty, serves the public, admin and host APIs on 127.0.0.1:8000/8001/8002, runs the scaler loop (which
launches simulated hosts that shake hands over HTTP) and prints ready-to-use tokens.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from apiflask import APIFlask
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from werkzeug.serving import BaseWSGIServer, make_server

from fractal.auth.dev_keys import ensure_dev_keypair, mint_token
from fractal.blueprints import API_TITLES, BLUEPRINTS_BY_API
from fractal.cloud import build_cloud_provider
from fractal.cloud.local import LocalCloud
from fractal.config import Environment, Settings, load_settings
from fractal.database import SessionFactory, create_db_engine, create_session_factory
from fractal.factory import create_app
from fractal.images import ImageSpec, upsert_image
from fractal.migrations import upgrade_to_head
from fractal.models import Image
from fractal.scaling.runner import build_wakeup, start_scaler_thread
from fractal.web import EXTENSION_KEY

ROOT = Path(__file__).resolve().parent.parent
DEMO_REGIONS = ("us-east-1", "eu-west-1")
DEMO_COMMIT = "demo-0001"
DEMO_CAPACITY = 4
# One simulated host per region stays free; assigning more makes the scaler launch another.
DEMO_TARGET_FREE = 4


def seed_demo_images(session: Session) -> bool:
    """An active demo image in two regions, only into an empty database; the scaler launches their hosts."""
    if session.execute(select(func.count()).select_from(Image)).scalar_one() > 0:
        return False
    for region in DEMO_REGIONS:
        upsert_image(
            session,
            region=region,
            client_commit_hash=DEMO_COMMIT,
            spec=ImageSpec(
                ami_id="ami-demo",
                active=True,
                instance_type="local.sim",
                mandelbox_capacity=DEMO_CAPACITY,
                target_free=DEMO_TARGET_FREE,
            ),
            actor="devserver",
        )
    return True


class ServerThread(threading.Thread):
    def __init__(self, app: APIFlask, host: str, port: int) -> None:
        super().__init__(daemon=True, name=f"fractal-{port}")
        self.server: BaseWSGIServer = make_server(host, port, app, threaded=True)

    def run(self) -> None:
        self.server.serve_forever()

    def shutdown(self) -> None:
        self.server.shutdown()


def build_apps(settings: Settings, session_factory: SessionFactory) -> dict[str, APIFlask]:
    apps = {
        name: create_app(
            blueprints=blueprints, settings=settings, session_factory=session_factory, title=API_TITLES[name]
        )
        for name, blueprints in BLUEPRINTS_BY_API.items()
    }
    # Without Redis each app would keep its own in-process cache, so an image the admin API changes would stay
    # invisible to the public API for up to FRACTAL_CACHE_TTL_S. The three apps share this process: share one cache,
    # and the admin change's invalidation reaches the public API at once, as Redis makes it do across processes.
    shared = apps["public"].extensions[EXTENSION_KEY].cache
    for app in apps.values():
        app.extensions[EXTENSION_KEY].cache = shared
    return apps


def served_host_api_url(settings: Settings, host: str, host_port: int) -> str:
    """The host API URL simulated hosts are told: FRACTAL_HOST_API_URL when set, else the one served here.

    The simulated hosts run in this process, so a wildcard bind address is reached through loopback.
    """
    if "host_api_url" in settings.model_fields_set:
        return settings.host_api_url
    reachable = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104 (mapping only)
    if ":" in reachable:  # an IPv6 literal
        reachable = f"[{reachable}]"
    return f"http://{reachable}:{host_port}"


def print_welcome(settings: Settings, ports: dict[str, int], host: str) -> None:
    pair = ensure_dev_keypair()
    user = mint_token(pair.private_pem, user_id="dev-user", audience=settings.jwt_audience, issuer=settings.jwt_issuer)
    admin = mint_token(
        pair.private_pem, user_id="dev-admin", admin=True, audience=settings.jwt_audience, issuer=settings.jwt_issuer
    )
    base = {name: f"http://{host}:{port}" for name, port in ports.items()}
    print(
        f"""
Fractal is running ({settings.env}, database {settings.database_url.split("@")[-1]}).
  public API  {base["public"]}   docs {base["public"]}/docs
  admin API   {base["admin"]}   docs {base["admin"]}/docs   fleet page {base["admin"]}/ui/ (paste $ADMIN_TOKEN)
  host API    {base["host"]}   docs {base["host"]}/docs
  simulated hosts call {settings.host_api_url}

Try it:
  export TOKEN={user}
  export ADMIN_TOKEN={admin}
  curl -s {base["public"]}/regions -H "Authorization: Bearer $TOKEN"
  curl -s -X POST {base["public"]}/mandelbox/assign -H "Authorization: Bearer $TOKEN" \\
       -H 'Content-Type: application/json' -d '{{"regions": ["us-east-1"], "client_commit_hash": "local_dev"}}'
  curl -s {base["admin"]}/admin/instances -H "Authorization: Bearer $ADMIN_TOKEN"

Press Ctrl-C to stop.""",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--host", default=os.environ.get("FRACTAL_DEV_HOST", "127.0.0.1"), help="bind address (FRACTAL_DEV_HOST)"
    )
    parser.add_argument(
        "--public-port", type=int, default=int(os.environ.get("FRACTAL_PUBLIC_PORT", "8000")), help="public API port"
    )
    parser.add_argument(
        "--admin-port", type=int, default=int(os.environ.get("FRACTAL_ADMIN_PORT", "8001")), help="admin API port"
    )
    parser.add_argument(
        "--host-port",
        type=int,
        default=int(os.environ.get("FRACTAL_HOST_PORT", "8002")),
        help="host API port; simulated hosts are told this one unless FRACTAL_HOST_API_URL is set",
    )
    parser.add_argument("--no-seed", action="store_true", help="Do not seed the demo images into an empty database.")
    args = parser.parse_args(argv)

    settings = load_settings()
    if settings.env is Environment.PRODUCTION:
        print("devserver is for development; run the apps under gunicorn in production (see README).", file=sys.stderr)
        return 2
    # The scaler tells every host it launches where the host API is: the one this process serves, whatever
    # --host/--host-port say, unless FRACTAL_HOST_API_URL names another on purpose.
    settings = settings.model_copy(update={"host_api_url": served_host_api_url(settings, args.host, args.host_port)})
    upgrade_to_head(settings.database_url)
    engine = create_db_engine(settings)
    session_factory = create_session_factory(engine)
    if not args.no_seed:
        with session_factory() as session:
            seed_demo_images(session)

    ports = {"public": args.public_port, "admin": args.admin_port, "host": args.host_port}
    apps = build_apps(settings, session_factory)
    threads = [ServerThread(apps[name], args.host, port) for name, port in ports.items()]
    for thread in threads:
        thread.start()
    stoppers: list[Callable[[], None]] = [thread.shutdown for thread in threads]
    # The scaler launches simulated hosts (FRACTAL_CLOUD=local) that speak real HTTP to the host API above;
    # it shares the process-wide nudge that assign fires when it runs out of room.
    cloud = build_cloud_provider(settings)
    stoppers.insert(0, start_scaler_thread(settings, session_factory, cloud, wakeup=build_wakeup(settings)))
    if isinstance(cloud, LocalCloud):
        stoppers.insert(0, cloud.shutdown)
    print_welcome(settings, ports, args.host)

    stop = threading.Event()

    def _on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    stop.wait()
    for stopper in reversed(stoppers):
        stopper()
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
