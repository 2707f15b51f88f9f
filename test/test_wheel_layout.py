"""The image as shipped, without Docker: the wheel in a venv outside the checkout, the runtime stage's files.

The Dockerfile is read to know what the image holds: the build stage's COPY lines say what the wheel is built
from, the runtime stage's COPY lines which files sit in its WORKDIR, its ENV lines what the processes see (paths
under WORKDIR and /tmp are mapped into this test's directories). Then `python env.py` runs there as the container's
CMD does, so an installed package that cannot find its migrations, or a file the image forgets, fails here.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from fractal.auth.dev_keys import mint_token
from test.conftest import PG_SERVER_URL, alembic_config, create_database, drop_database
from test.processes import StartedProcess, free_port, http_get, start_sequence, stopping, wait_until_ready
from test.test_packaging import stages
from test.test_start_sequence import alembic_versions

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")  # .dockerignore keeps these out of the build context


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    destination: str


@dataclass(frozen=True)
class Installed:
    """A venv outside the checkout holding the wheel, and a directory laid out as the image's WORKDIR."""

    python: str
    app_dir: Path
    env: dict[str, str]
    tmp: Path

    def environment(self, name: str) -> dict[str, str]:
        """The image's ENV for one process: its own empty /tmp (compose mounts a fresh tmpfs there)."""
        tmp = self.tmp / f"tmp-{name}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        return {key: value.replace("@TMP@", str(tmp)) for key, value in self.env.items()}


def copies(stage: list[str]) -> list[Copy]:
    """The stage's COPY instructions from the build context (not --from another stage), flags dropped."""
    result = []
    for line in stage:
        if not line.upper().startswith("COPY "):
            continue
        words = line.split()[1:]
        if any(word.startswith("--from") for word in words):
            continue
        words = [word for word in words if not word.startswith("--")]
        result.append(Copy(sources=words[:-1], destination=words[-1]))
    return result


def instruction(stage: list[str], name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in stage if line.upper().startswith(name + " ")]


def env_values(stage: list[str]) -> dict[str, str]:
    """ENV key=value pairs (the only form the Dockerfile uses)."""
    values: dict[str, str] = {}
    for body in instruction(stage, "ENV"):
        for pair in body.split():
            key, _, value = pair.partition("=")
            values[key] = value
    return values


def lay_out(copy_list: list[Copy], target: Path) -> None:
    """Copy from the checkout exactly what the COPY instructions name, where they put it (relative to WORKDIR)."""
    for copy in copy_list:
        destination = target / copy.destination
        for source in copy.sources:
            path = ROOT / source
            assert path.exists(), f"the Dockerfile copies {source}, which the checkout does not have"
            if copy.destination.endswith("/") or len(copy.sources) > 1:
                place = destination / Path(source).name
            else:
                place = destination
            place.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, place, ignore=IGNORED)
            else:
                shutil.copy2(path, place)


def moved(value: str, workdir: str, app_dir: Path) -> str:
    """An image path in this test's directories: WORKDIR is ``app_dir``, /tmp is the process's own."""
    if value == workdir or value.startswith(workdir + "/"):
        return str(app_dir) + value[len(workdir) :]
    if value == "/tmp" or value.startswith("/tmp/"):
        return "@TMP@" + value[len("/tmp") :]
    return value


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel from the build stage's files, install it into a fresh venv, lay out the runtime stage."""
    build, runtime = stages((ROOT / "Dockerfile").read_text())[-2:]
    base = tmp_path_factory.mktemp("wheel-layout")
    source = base / "src"
    lay_out(copies(build), source)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(base / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=180,
    )
    (wheel,) = (base / "dist").glob("fractal-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    # Only the package comes from the wheel; its dependencies are the test venv's, seen through a .pth line
    # (which does not run the test venv's own .pth files, so the checkout's editable install stays invisible).
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=180,
    )
    site_packages = next(venv.glob("lib/python*/site-packages"))
    test_site = next(path for path in sys.path if path.endswith("site-packages") and Path(path).is_dir())
    (site_packages / "zz_test_dependencies.pth").write_text(test_site + "\n")

    workdir = instruction(runtime, "WORKDIR")[-1]
    app_dir = base / "app"
    app_dir.mkdir()
    lay_out(copies(runtime), app_dir)
    env = {key: value for key, value in env_values(runtime).items() if key != "PATH"}
    # The image's absolute paths, moved into this test's directories.
    env = {key: moved(value, workdir, app_dir) for key, value in env.items()}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    env["HOME"] = str(app_dir)
    return Installed(python=python, app_dir=app_dir, env=env, tmp=base)


def test_the_package_comes_from_the_wheel_and_the_layout_holds_no_source(installed: Installed) -> None:
    result = subprocess.run(
        [installed.python, "-c", "import fractal, alembic.config; print(fractal.__file__)"],
        cwd=installed.app_dir,
        env=installed.environment("probe"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    location = Path(result.stdout.strip())
    assert "site-packages" in location.parts and not location.is_relative_to(ROOT), location
    assert location.is_relative_to(installed.tmp)
    assert not (installed.app_dir / "fractal").exists()
    assert (location.parent / "mail" / "templates").is_dir()  # package data ships in the wheel


@pytest.fixture(scope="module")
def empty_database() -> Iterator[str]:
    name = f"fractal_wheel_{uuid.uuid4().hex[:8]}"
    url = create_database(PG_SERVER_URL, name)
    yield url
    drop_database(PG_SERVER_URL, name)


def start(installed: Installed, role: str, database_url: str, log_dir: Path, **env: str) -> StartedProcess:
    return start_sequence(
        role,
        database_url,
        log_dir,
        python=installed.python,
        app_dir=installed.app_dir,
        base_env=installed.environment(role),
        **env,
    )


def wait_for_metrics(started: StartedProcess, port: int, timeout_s: float = 60) -> bytes:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if started.process.poll() is not None:
            raise AssertionError(f"exited with {started.process.returncode}:\n{started.log_text()}")
        try:
            status, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout_s=2)
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no metrics on :{port} after {timeout_s}s:\n{started.log_text()}")


def test_every_role_starts_from_the_image_layout_and_three_replicas_migrate_once(
    installed: Installed, empty_database: str, tmp_path: Path
) -> None:
    # Development settings: the gunicorn workers of every shell also race to create the development key.
    env = {"FRACTAL_ENV": "development", "FRACTAL_CLOUD": "local"}
    scaler_metrics = free_port()
    publics = [start(installed, "public", empty_database, tmp_path, **env) for _ in range(3)]
    others = [start(installed, role, empty_database, tmp_path, **env) for role in ("admin", "host")]
    scaler = start(
        installed, "scaler", empty_database, tmp_path, FRACTAL_SCALER_METRICS_PORT=str(scaler_metrics), **env
    )
    with stopping(*publics, *others, scaler):
        for shell in [*publics, *others]:
            wait_until_ready(shell, timeout_s=90)
            assert http_get(shell.url + "/healthz")[0] == 200
            status, body = http_get(shell.url + "/readyz")
            assert status == 200 and json.loads(body)["checks"]["database"] == "ok", body
        assert b"fractal_" in wait_for_metrics(scaler, scaler_metrics)
        logs = [started.log_text() for started in [*publics, *others, scaler]]
        keys = {(installed.app_dir / "instance" / "dev_jwt_public.pem").read_text()}
        assert scaler.process.poll() is None, scaler.log_text()
        console_script_works(installed, others[0])
    migrating = [log for log in logs if "Running upgrade" in log]
    assert len(migrating) == 1, "\n---\n".join(logs)
    revisions = list(ScriptDirectory.from_config(alembic_config()).walk_revisions())
    assert migrating[0].count("Running upgrade") == len(revisions)
    assert len(alembic_versions(empty_database)) == 1
    assert all("Traceback" not in log for log in logs)
    assert len(keys) == 1


def console_script_works(installed: Installed, admin: StartedProcess) -> None:
    """The wheel's `fractal` console script, against the admin API the wheel serves."""
    private_pem = (installed.app_dir / "instance" / "dev_jwt_private.pem").read_text()
    env = {**installed.environment("console"), "FRACTAL_ADMIN_URL": admin.url}
    env["FRACTAL_ADMIN_TOKEN"] = mint_token(private_pem, user_id="wheel-operator", admin=True)
    script = str(Path(installed.python).parent / "fractal")
    listed = subprocess.run(
        [script, "--json", "capacity"], env=env, cwd=installed.app_dir, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), list)
    dead = subprocess.run(
        [script, "--url", f"http://127.0.0.1:{free_port()}", "capacity"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dead.returncode == 3 and dead.stderr.startswith("error: cannot reach"), dead.stderr


def test_an_unreachable_database_exits_3_within_its_bound(installed: Installed, tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    began = time.monotonic()
    started = start(installed, "public", url, tmp_path, FRACTAL_DB_WAIT_TIMEOUT_S="2")
    with stopping(started):
        code = started.process.wait(timeout=30)
    assert code == 3
    assert time.monotonic() - began < 20
    assert "giving up" in started.log_text() and "not reachable after 2s" in started.log_text()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"FRACTAL_ENV": "production"}, "FRACTAL_JWT_AUDIENCE"),
        ({"FRACTAL_ENV": "production", "FRACTAL_SECRET_KEY": "change-me-please"}, "FRACTAL_SECRET_KEY"),
        ({"FRACTAL_ENV": "production", "FRACTAL_CLOUD": "local"}, "FRACTAL_CLOUD"),
    ],
)
def test_an_unsafe_setting_exits_2_naming_it(
    installed: Installed, tmp_path: Path, env: dict[str, str], named: str
) -> None:
    safe = {
        "FRACTAL_JWKS_URL": "https://issuer.example/jwks.json",
        "FRACTAL_JWT_AUDIENCE": "fractal",
        "FRACTAL_JWT_ISSUER": "https://issuer.example/",
        "FRACTAL_SECRET_KEY": "a-real-secret",
        "FRACTAL_CLOUD": "aws",
    }
    if named == "FRACTAL_JWT_AUDIENCE":
        safe.pop("FRACTAL_JWT_AUDIENCE")
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/never-reached"
    began = time.monotonic()
    started = start(installed, "admin", url, tmp_path, **{**safe, **env})
    with stopping(started):
        code = started.process.wait(timeout=30)
    assert code == 2
    assert time.monotonic() - began < 20
    log = started.log_text()
    assert "refusing to start" in log and named in log, log
    assert "Traceback" not in log


def test_missing_migrations_exit_4_with_one_line_saying_where_it_looked(installed: Installed, tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere" / "alembic.ini"
    url = f"sqlite:///{tmp_path / 'fractal.db'}"
    started = start(installed, "public", url, tmp_path, FRACTAL_ALEMBIC_INI=str(nowhere))
    with stopping(started):
        code = started.process.wait(timeout=30)
    assert code == 4
    log = started.log_text()
    failures = [line for line in log.splitlines() if "migration failed" in line]
    assert len(failures) == 1 and str(nowhere) in failures[0] and "FRACTAL_ALEMBIC_INI" in failures[0], log
    assert "Traceback" not in log


def test_the_image_env_points_at_the_copied_migrations() -> None:
    runtime = stages((ROOT / "Dockerfile").read_text())[-1]
    workdir = instruction(runtime, "WORKDIR")[-1]
    ini = env_values(runtime)["FRACTAL_ALEMBIC_INI"]
    copied = {source for copy in copies(runtime) for source in copy.sources}
    assert ini == f"{workdir}/alembic.ini"
    assert {"alembic.ini", "alembic", "env.py"} <= copied
    assert re.fullmatch(r"/[\w/]+", workdir)


def test_nothing_the_dockerfile_copies_is_left_out_of_the_build_context() -> None:
    """The layout above copies from the checkout; the image copies from the context, less .dockerignore."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in stages((ROOT / "Dockerfile").read_text())[-2:]:
        for copy in copies(stage):
            for source in copy.sources:
                ignored = [pattern for pattern in patterns if fnmatch.fnmatch(source, pattern.removeprefix("**/"))]
                assert not ignored, f"{source} is copied but .dockerignore drops it ({ignored})"
