"""The real image, built and run by a Docker engine: `./commands image-test` (not part of the default suite).

No container registry is reachable here, so the base image is made from Debian's packages (debootstrap minbase +
python3, imported once as fractal-base:bookworm and reused), the project's image is built from it with the classic
builder on the host network, and every container runs as compose runs it (read-only, tmpfs /tmp, a volume on
/app/instance) against this machine's Postgres and Redis through host networking. Docker's own engine comes from
Debian's docker.io, installed when missing; a dockerd this test starts is stopped by pid at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from test.conftest import PG_SERVER_URL, REDIS_SERVER_URL, alembic_config, create_database, drop_database
from test.processes import free_port, http_get
from test.test_packaging import compose_binary
from test.test_start_sequence import alembic_versions

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FRACTAL_IMAGE_TEST") != "1", reason="real-image check: ./commands image-test"),
]

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = os.environ.get("FRACTAL_BASE_IMAGE", "fractal-base:bookworm")
IMAGE = "fractal:image-test"
ROLES = ("public", "admin", "host", "scaler")


def run(*argv: str, timeout: float = 600, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check, **kwargs)  # type: ignore[call-overload,no-any-return]


def log_step(message: str, began: float) -> None:
    print(f"[image-test] {message} in {time.monotonic() - began:.1f}s", flush=True)


def apt_install(*packages: str) -> None:
    run("apt-get", "update", "-qq")
    run("apt-get", "install", "-y", "-qq", *packages, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def engine_answers() -> bool:
    return shutil.which("docker") is not None and run("docker", "info", check=False, timeout=30).returncode == 0


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A running dockerd: the one already up, or Debian's docker.io started here (and stopped after, by pid)."""
    began = time.monotonic()
    if not shutil.which("dockerd"):
        apt_install("docker.io")
        log_step("installed docker.io", began)
    started: subprocess.Popen[bytes] | None = None
    if not engine_answers():
        log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
        with log_path.open("wb") as log:
            started = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not engine_answers():
            assert started.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        log_step(f"started dockerd (pid {started.pid})", began)
    try:
        yield
    finally:
        if started is not None:
            started.terminate()
            try:
                started.wait(timeout=30)
            except subprocess.TimeoutExpired:
                started.kill()
                started.wait(timeout=10)


def debian_mirror() -> str:
    """The machine's own Debian mirror (it is reachable; the default may not be)."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            text = path.read_text()
            match = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.MULTILINE) or re.search(
                r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s+bookworm", text, re.MULTILINE
            )
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="session")
def base_image(docker_engine: None) -> str:
    """Debian bookworm minbase with Debian's python3, made with debootstrap once and reused afterwards."""
    if run("docker", "image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        print(f"[image-test] reusing {BASE_IMAGE}", flush=True)
        return BASE_IMAGE
    began = time.monotonic()
    if not shutil.which("debootstrap"):
        apt_install("debootstrap")
    with tempfile.TemporaryDirectory(prefix="fractal-rootfs-") as directory:
        rootfs = Path(directory) / "rootfs"
        run(
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,python-is-python3,ca-certificates",
            "bookworm",
            str(rootfs),
            debian_mirror(),
            timeout=1200,
        )
        # This machine reaches the package index through its own TLS authority: the base image trusts what the
        # machine trusts, and pip in the build stage is told to use the system bundle (pip's own would refuse it).
        extra = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        for certificate in extra:
            shutil.copy(certificate, rootfs / "usr/local/share/ca-certificates" / certificate.name)
        if extra:
            run("chroot", str(rootfs), "update-ca-certificates")
        (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", BASE_IMAGE],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        tar.wait(timeout=60)
        assert imported.returncode == 0, imported.stderr
    log_step(f"built {BASE_IMAGE} with debootstrap", began)
    return BASE_IMAGE


@pytest.fixture(scope="session")
def image(base_image: str) -> str:
    """The project's image from the Dockerfile as it is, on the debootstrap base."""
    began = time.monotonic()
    result = run(
        "docker",
        "build",
        "--network",
        "host",
        "--build-arg",
        f"PYTHON_IMAGE={base_image}",
        "-t",
        IMAGE,
        str(ROOT),
        env={**os.environ, "DOCKER_BUILDKIT": "0"},  # the classic builder: BuildKit wants registries
        check=False,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    log_step(f"built {IMAGE}", began)
    return IMAGE


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = f"fractal_image_{uuid.uuid4().hex[:8]}"
    url = create_database(PG_SERVER_URL, name)
    yield url
    drop_database(PG_SERVER_URL, name)


def plain_url(url: str) -> str:
    """The URL as an operator writes it (postgresql://), for the container's DATABASE_URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Containers:
    """Containers and volumes this test made, removed by id at the end."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.volumes: list[str] = []

    def volume(self) -> str:
        name = f"fractal-image-test-{uuid.uuid4().hex[:8]}"
        run("docker", "volume", "create", name)
        self.volumes.append(name)
        return name

    def start(self, image: str, env: dict[str, str], volume: str) -> str:
        argv = ["docker", "run", "-d", "--network", "host", "--read-only", "--tmpfs", "/tmp"]
        argv += ["--security-opt", "no-new-privileges:true", "-v", f"{volume}:/app/instance"]
        for key, value in env.items():
            argv += ["-e", f"{key}={value}"]
        container = run(*argv, image).stdout.strip()
        self.ids.append(container)
        return container

    def remove(self) -> None:
        if self.ids:
            run("docker", "rm", "-f", *self.ids, check=False)
        if self.volumes:
            run("docker", "volume", "rm", *self.volumes, check=False)


@pytest.fixture
def containers() -> Iterator[Containers]:
    made = Containers()
    try:
        yield made
    finally:
        made.remove()


def logs(container: str) -> str:
    result = run("docker", "logs", container, check=False)
    return result.stdout + result.stderr


def state(container: str) -> dict[str, object]:
    parsed: dict[str, object] = json.loads(run("docker", "inspect", "--format", "{{json .State}}", container).stdout)
    return parsed


def restarts(container: str) -> int:
    return int(run("docker", "inspect", "--format", "{{.RestartCount}}", container).stdout.strip())


def wait_healthy(container: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = state(container)
        if not current.get("Running"):
            raise AssertionError(f"exited with {current.get('ExitCode')}:\n{logs(container)}")
        health = current.get("Health")
        if isinstance(health, dict) and health.get("Status") == "healthy":
            return
        time.sleep(1)
    raise AssertionError(f"not healthy after {timeout_s}s: {state(container).get('Health')}\n{logs(container)}")


def wait_exit(container: str, timeout_s: float = 60) -> int:
    result = run("docker", "wait", container, timeout=timeout_s)
    return int(result.stdout.strip())


def development_env(database_url: str, redis_db: int) -> dict[str, str]:
    redis_url = make_url(REDIS_SERVER_URL.replace("redis://", "postgresql://", 1))  # only to edit the path
    redis = f"redis://{redis_url.host or '127.0.0.1'}:{redis_url.port or 6379}/{redis_db}"
    return {
        "FRACTAL_ENV": "development",
        "FRACTAL_CLOUD": "local",
        "DATABASE_URL": plain_url(database_url),
        "REDIS_URL": redis,
        "FRACTAL_REDIS_PREFIX": f"fractal-image-{uuid.uuid4().hex[:6]}:",
        "GUNICORN_WORKERS": "2",
    }


def test_every_role_migrates_once_then_serves_in_the_real_image(
    image: str, empty_database: str, containers: Containers
) -> None:
    began = time.monotonic()
    base = development_env(empty_database, redis_db=14)
    volume = containers.volume()  # one instance volume, fresh: the workers of every API race for the dev key
    ports = {role: free_port() for role in ROLES}
    base["FRACTAL_HOST_API_URL"] = f"http://127.0.0.1:{ports['host']}"  # the simulated hosts call it
    started = {}
    for role in ROLES:
        env = {**base, "FRACTAL_APP": role, "GUNICORN_BIND": f"127.0.0.1:{ports[role]}"}
        if role == "scaler":
            env["FRACTAL_SCALER_METRICS_PORT"] = str(ports[role])
        started[role] = containers.start(image, env, volume)
    for container in started.values():
        wait_healthy(container)  # the image's own HEALTHCHECK
    log_step("four roles healthy", began)
    for role in ("public", "admin", "host"):
        status, body = http_get(f"http://127.0.0.1:{ports[role]}/readyz")
        assert status == 200, body
        checks = json.loads(body)["checks"]
        assert checks["database"] == "ok" and checks["redis"] == "ok", body
    status, body = http_get(f"http://127.0.0.1:{ports['scaler']}/metrics")
    assert status == 200 and b"fractal_" in body
    # Development tokens from the image verify in every worker of the public API (one key won the race).
    token = run("docker", "exec", started["public"], "flask", "--app", "app", "token").stdout.strip().splitlines()[-1]
    for _ in range(12):
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports['public']}/regions", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
    texts = {role: logs(container) for role, container in started.items()}
    migrating = [role for role, text in texts.items() if "Running upgrade" in text]
    assert len(migrating) == 1, texts
    revisions = list(ScriptDirectory.from_config(alembic_config()).walk_revisions())
    assert texts[migrating[0]].count("Running upgrade") == len(revisions)
    assert len(alembic_versions(empty_database)) == 1
    for role, container in started.items():
        assert state(container)["Running"] and restarts(container) == 0, role
        assert "Traceback" not in texts[role], texts[role]


def test_the_image_refuses_unsafe_production_and_gives_up_on_a_missing_database(
    image: str, containers: Containers
) -> None:
    volume = containers.volume()
    unsafe = containers.start(
        image,
        {
            "FRACTAL_ENV": "production",
            "DATABASE_URL": "postgresql://fractal:change-me@127.0.0.1:5432/fractal",
            "FRACTAL_JWKS_URL": "https://issuer.example/jwks.json",
            "FRACTAL_JWT_AUDIENCE": "fractal",
            "FRACTAL_JWT_ISSUER": "https://issuer.example/",
            "FRACTAL_SECRET_KEY": "a-real-secret",
            "FRACTAL_CLOUD": "aws",
        },
        volume,
    )
    missing = containers.start(
        image,
        {"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/none", "FRACTAL_DB_WAIT_TIMEOUT_S": "3"},
        volume,
    )
    assert wait_exit(unsafe) == 2
    assert "refusing to start" in logs(unsafe) and "DATABASE_URL" in logs(unsafe)
    assert wait_exit(missing) == 3
    assert "giving up" in logs(missing)


def compose_env_file(directory: Path, database_url: str, ports: dict[str, int]) -> Path:
    """The .env an operator writes from .env.example for a local try-out, pointed at this machine's services."""
    text = (ROOT / ".env.example").read_text()
    try_out = text[text.index("# --- a local try-out") :]
    text = text.replace(try_out, re.sub(r"^# (FRACTAL_[A-Z_]+=.*)$", r"\1", try_out, flags=re.MULTILINE))
    text += (
        f"\nDATABASE_URL={plain_url(database_url)}\n"
        f"REDIS_URL=redis://127.0.0.1:6379/13\n"
        f"FRACTAL_REDIS_PREFIX=fractal-compose-{uuid.uuid4().hex[:6]}:\n"
        f"FRACTAL_HOST_API_URL=http://127.0.0.1:{ports['host']}\n"
        "FRACTAL_SCALER_INTERVAL_S=2\n"
    )
    path = directory / ".env"
    path.write_text(text)
    return path


OVERRIDE = """
# Host networking against this machine's Postgres and Redis: the stack's own postgres and redis stay down.
services:
{services}
"""


def override_file(directory: Path, ports: dict[str, int], metrics_ports: dict[str, int]) -> Path:
    """Host networking: every role its own port, and the public and host APIs' metrics ports (9100 each on the
    compose network) one each too."""
    blocks = []
    for role in ROLES:
        bind = f"127.0.0.1:{ports[role]}"
        extra = f'\n      FRACTAL_SCALER_METRICS_PORT: "{ports[role]}"' if role == "scaler" else ""
        if role in metrics_ports:
            extra += f'\n      FRACTAL_METRICS_PORT: "{metrics_ports[role]}"'
        blocks.append(
            f"  {role}:\n    network_mode: host\n    ports: !reset []\n    depends_on: !reset {{}}\n"
            f'    restart: "no"\n    environment:\n      GUNICORN_BIND: {bind}{extra}\n'
        )
    path = directory / "compose.override.yml"
    path.write_text(OVERRIDE.format(services="".join(blocks)))
    return path


def test_docker_compose_up_runs_the_stack_from_the_template(
    image: str, base_image: str, empty_database: str, tmp_path: Path
) -> None:
    began = time.monotonic()
    ports = {role: free_port() for role in ROLES}
    env_file = compose_env_file(tmp_path, empty_database, ports)
    metrics_ports = {role: free_port() for role in ("public", "host")}
    override = override_file(tmp_path, ports, metrics_ports)
    project = f"fractal-image-test-{uuid.uuid4().hex[:6]}"
    compose = [compose_binary(), "--project-name", project, "--project-directory", str(ROOT)]
    compose += ["--env-file", str(env_file), "-f", str(ROOT / "docker-compose.yml"), "-f", str(override)]
    env = {
        **os.environ,
        "FRACTAL_ENV_FILE": str(env_file),
        "FRACTAL_IMAGE": f"fractal:{project}",
        "PYTHON_IMAGE": base_image,
        "DOCKER_BUILDKIT": "0",  # compose falls back to the classic builder: no buildx, no registry
    }
    try:
        # Built once, by `public`, with the build argument (the layers are the `image` fixture's, so it is quick).
        build = run(*compose, "build", env=env, check=False, timeout=900)
        assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
        built = re.findall(r"Service (\w+)\s+Built", build.stdout + build.stderr)
        assert built == ["public"], build.stdout + build.stderr
        up = run(*compose, "up", "-d", "--no-build", *ROLES, env=env, check=False, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        ids = run(*compose, "ps", "-q", *ROLES, env=env).stdout.split()
        assert len(ids) == len(ROLES)
        for container in ids:
            wait_healthy(container)
        log_step("docker compose up: four services healthy", began)
        time.sleep(6)  # a few scaler passes: a crash loop would show as a restart or an exit here
        for container in ids:
            current = state(container)
            assert current["Running"] and restarts(container) == 0, logs(container)
        for role in ("public", "admin", "host"):
            assert http_get(f"http://127.0.0.1:{ports[role]}/readyz")[0] == 200
        # What deploy/prometheus/prometheus.yml scrapes: the admin API's /metrics, the others' metrics ports.
        assert b"fractal_dependency_ready" in http_get(f"http://127.0.0.1:{ports['admin']}/metrics")[1]
        for role, port in metrics_ports.items():
            status, body = http_get(f"http://127.0.0.1:{port}/metrics")
            assert status == 200 and b"flask_http_request_duration_seconds" in body, role
        exec_token = run(*compose, "exec", "-T", "public", "flask", "--app", "app", "token", env=env)
        token = exec_token.stdout.strip().splitlines()[-1]
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports['public']}/regions", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # the try-out's token is accepted
            assert response.status == 200
        assert len(alembic_versions(empty_database)) == 1
    finally:
        run(*compose, "down", "-v", "--timeout", "10", env=env, check=False, timeout=300)
        run("docker", "rmi", f"fractal:{project}", check=False)
