"""development/api_exploration.ipynb runs top to bottom (nbmake) against three APIs started by env.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, text

from fractal.auth.dev_keys import ensure_dev_keypair, mint_token
from fractal.config import DEV_PRIVATE_KEY_PATH, DEV_PUBLIC_KEY_PATH, normalise_database_url
from test.processes import ROOT, Stack, http_get

NOTEBOOK = ROOT / "development" / "api_exploration.ipynb"
pytestmark = pytest.mark.slow


def test_notebook_is_committed_with_outputs_cleared() -> None:
    notebook = json.loads(NOTEBOOK.read_text())
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code_cells
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code_cells)
    assert any("FRACTAL_API_URL" in "".join(cell["source"]) for cell in code_cells)


def active_images(admin_url: str, headers: dict[str, str]) -> set[tuple[str, str]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 50, **({"cursor": cursor} if cursor else {})}
        page = requests.get(f"{admin_url}/admin/images", params=params, headers=headers, timeout=10).json()
        rows += page["images"]
        if not (cursor := page["next_cursor"]):
            return {(row["region"], row["client_commit_hash"]) for row in rows if row["active"]}


def quick_start_host(stack: Stack, operator: dict[str, str]) -> str:
    """What `./commands run` gives a newcomer: the newest active image of us-east-1 and an ACTIVE host for it."""
    commit = f"qs{uuid.uuid4().hex[:8]}"
    image = {
        "ami_id": "ami-demo",
        "active": True,
        "instance_type": "local.sim",
        "mandelbox_capacity": 4,
        "target_free": 0,
    }
    put = requests.put(f"{stack.admin.url}/admin/images/us-east-1/{commit}", json=image, headers=operator, timeout=10)
    assert put.status_code in (200, 201), put.text
    name = f"qs-host-{commit}"
    registered = requests.post(
        f"{stack.admin.url}/admin/instances",
        headers=operator,
        timeout=10,
        json={
            "instance_name": name,
            "region": "us-east-1",
            "client_commit_hash": commit,
            "mandelbox_capacity": 4,
        },
    )
    assert registered.status_code == 201, registered.text
    hello = requests.post(
        f"{stack.host.url}/host/handshake",
        headers={"Authorization": f"Bearer {registered.json()['host_secret']}"},
        json={"instance_name": name, "ip": "10.0.0.7", "client_commit_hash": commit, "mandelbox_capacity": 4},
        timeout=10,
    )
    assert hello.status_code == 200, hello.text
    return name


def test_notebook_runs_against_live_servers(three_shells: Stack) -> None:
    keys = ensure_dev_keypair(ROOT / DEV_PRIVATE_KEY_PATH, ROOT / DEV_PUBLIC_KEY_PATH)
    operator = {"Authorization": f"Bearer {mint_token(keys.private_pem, user_id='nb-test-operator', admin=True)}"}
    host_spec = json.loads(http_get(three_shells.host.url + "/openapi.json")[1])
    quick_start = quick_start_host(three_shells, operator) if "/host/handshake" in host_spec["paths"] else None
    active_before = active_images(three_shells.admin.url, operator)
    env = {
        **os.environ,
        "FRACTAL_API_URL": three_shells.public.url,
        "FRACTAL_ADMIN_API_URL": three_shells.admin.url,
        "FRACTAL_HOST_API_URL": three_shells.host.url,
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--nbmake",
            "--nbmake-timeout=120",
            str(NOTEBOOK),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout
    # What the tour did is in the database: an image for its version and, with the host protocol served,
    # a mandelbox that went all the way to EXITED.
    engine = create_engine(normalise_database_url(three_shells.database_url))
    try:
        with engine.connect() as connection:
            images = connection.execute(text("SELECT count(*) FROM images WHERE ami_id = 'ami-0notebook'")).scalar()
            exited = connection.execute(
                text("SELECT count(*) FROM mandelboxes WHERE user_id LIKE 'notebook-%' AND status = 'EXITED'")
            ).scalar()
            tour_hosts = (
                connection.execute(text("SELECT status FROM instances WHERE instance_name LIKE 'nb-host-%'"))
                .scalars()
                .all()
            )
    finally:
        engine.dispose()
    assert images == 1
    # The tour put back what it changed: the same active images, and its host takes no more work.
    assert active_images(three_shells.admin.url, operator) == active_before
    if quick_start is None:
        return
    assert exited == 1
    assert tour_hosts and all(s in ("DRAINING", "TERMINATING", "TERMINATED") for s in tour_hosts), tour_hosts
    # The README's Quick-start assign still lands on the Quick start's host (before the fix: the tour's version).
    user = {"Authorization": f"Bearer {mint_token(keys.private_pem, user_id=f'qs-{uuid.uuid4().hex[:6]}')}"}
    assign = requests.post(
        f"{three_shells.public.url}/mandelbox/assign",
        json={"regions": ["us-east-1"], "client_commit_hash": "local_dev"},
        headers=user,
        timeout=10,
    )
    assert assign.status_code == 201, assign.text
    assert assign.json()["instance_name"] == quick_start
