"""development/api_exploration.ipynb runs top to bottom (nbmake) against three APIs started by env.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, text

from fractal.config import normalise_database_url
from test.processes import ROOT, Stack, http_get

NOTEBOOK = ROOT / "development" / "api_exploration.ipynb"
pytestmark = pytest.mark.slow


def test_notebook_is_committed_with_outputs_cleared() -> None:
    notebook = json.loads(NOTEBOOK.read_text())
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code_cells
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code_cells)
    assert any("FRACTAL_API_URL" in "".join(cell["source"]) for cell in code_cells)


def test_notebook_runs_against_live_servers(three_shells: Stack) -> None:
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
    finally:
        engine.dispose()
    assert images == 1
    host_spec = json.loads(http_get(three_shells.host.url + "/openapi.json")[1])
    if "/host/handshake" in host_spec["paths"]:
        assert exited == 1
