"""Container start sequence: wait for the database, migrate, then exec the chosen process.

    FRACTAL_APP=public|admin|host  gunicorn serving app:app / admin_app:app / host_service_app:app
    FRACTAL_APP=scaler             the scaler loop (`flask --app admin_app scaler`)

The database wait is bounded (FRACTAL_DB_WAIT_TIMEOUT_S, default 60) with logged exponential backoff and exits
non-zero when time runs out; SQLite is not waited for. `alembic upgrade head` runs under the advisory lock held by
alembic/env.py, so any number of replicas of every shell may start at once: one migrates, the rest find the schema
at head. FRACTAL_MIGRATE=false skips the migration (e.g. for a one-off job against a migrated database). The
migrations are the alembic.ini and alembic/ beside this file (FRACTAL_ALEMBIC_INI names another alembic.ini): the
installed package does not carry them.

Exit codes, each with the cause in one log line: 2 invalid or unsafe settings (or an unknown FRACTAL_APP), 3 the
database did not answer in time, 4 the migration failed (scripts not found, a revision failing, a lock timeout).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent
ROLES: dict[str, str] = {
    "public": "app:app",
    "admin": "admin_app:app",
    "host": "host_service_app:app",
}
SCALER_ROLE = "scaler"
EXIT_BAD_CONFIG = 2
EXIT_DATABASE_TIMEOUT = 3
EXIT_MIGRATION_FAILED = 4
# The migrations sit beside this file (the checkout's root, the image's /app): say so instead of guessing.
ALEMBIC_INI = ROOT / "alembic.ini"

log = logging.getLogger("fractal.start")


def wait_for_database(url: str, *, timeout_s: float, max_backoff_s: float = 5.0) -> None:
    """Block until ``url`` accepts a connection; raise TimeoutError after ``timeout_s``."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool
    from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

    from fractal.observability import redact_text

    safe_url = make_url(url).render_as_string(hide_password=True)
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 3})
    attempts = 0

    def _log_retry(state: object) -> None:
        outcome = getattr(state, "outcome", None)
        error = outcome.exception() if outcome is not None else None
        sleep = getattr(getattr(state, "next_action", None), "sleep", 0.0)
        log.warning(
            "database not reachable yet: %s (attempt %d, retrying in %.1fs)",
            redact_text(type(error).__name__ + ": " + str(error).strip().splitlines()[0] if error else "?"),
            attempts,
            sleep,
        )

    try:
        for attempt in Retrying(
            stop=stop_after_delay(timeout_s),
            wait=wait_exponential(multiplier=0.25, max=max_backoff_s),
            retry=retry_if_exception_type(Exception),
            before_sleep=_log_retry,
            reraise=False,
        ):
            with attempt:
                attempts += 1
                with engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
    except RetryError as exc:
        raise TimeoutError(f"database {safe_url} not reachable after {timeout_s:.0f}s ({attempts} attempts)") from exc
    finally:
        engine.dispose()
    log.info("database %s reachable after %d attempt(s)", safe_url, attempts)


def migrate(database_url: str) -> None:
    """`alembic upgrade head` in-process (alembic/env.py takes the migration advisory lock).

    Uses the alembic.ini beside env.py unless FRACTAL_ALEMBIC_INI names another one.
    """
    from fractal.migrations import ALEMBIC_INI_ENV, upgrade_to_head

    upgrade_to_head(database_url, alembic_ini=None if os.environ.get(ALEMBIC_INI_ENV) else ALEMBIC_INI)


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, passwords redacted: a cause an operator can read in `docker logs`."""
    from fractal.observability import redact_text

    lines = str(exc).strip().splitlines()
    return redact_text(f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": "))


def command_for(role: str) -> list[str]:
    """The argv that replaces this process for ``role``."""
    if role == SCALER_ROLE:
        return [sys.executable, "-m", "flask", "--app", "admin_app", "scaler"]
    if role not in ROLES:
        raise ValueError(f"FRACTAL_APP must be one of {', '.join([*ROLES, SCALER_ROLE])}, not {role!r}")
    return [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py"), ROLES[role]]


def prepare_metrics_directory(role: str) -> None:
    """Make PROMETHEUS_MULTIPROC_DIR usable for ``role`` before the process that needs it starts.

    The image sets it to /tmp/prometheus, but compose mounts a fresh tmpfs on /tmp, which hides the directory the
    image made. gunicorn's workers share metrics through it, so it is created; the scaler is one process whose
    metrics live in memory, so the variable is dropped (prometheus_client would fail on a missing directory).
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if not directory:
        return
    if role == SCALER_ROLE:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        return
    os.makedirs(directory, exist_ok=True)


def healthcheck() -> int:
    """The container HEALTHCHECK: an API answers /healthz on its bind port; the scaler completed a pass lately."""
    try:
        from fractal.config import load_settings

        settings = load_settings()
        if settings.app == SCALER_ROLE:
            from fractal.scaling.health import check_scaler_health, health_max_age_s

            problem = check_scaler_health(settings.scaler_health_file, max_age_s=health_max_age_s(settings))
            if problem is not None:
                print(f"unhealthy: {problem}", file=sys.stderr)
                return 1
            return 0
        import urllib.request

        # gunicorn's own setting (gunicorn.conf.py reads it too), not one of Fractal's.

        port = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000").rsplit(":", 1)[-1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:  # any failure is "unhealthy"; say why on stderr for `docker inspect`
        print(f"unhealthy: {type(exc).__name__}", file=sys.stderr)
        return 1


def main() -> NoReturn:
    """Wait, migrate, exec (or, with the argument ``healthcheck``, probe and exit)."""
    if sys.argv[1:] == ["healthcheck"]:
        sys.exit(healthcheck())
    from fractal.config import describe_settings_error, load_settings
    from fractal.observability import configure_logging

    try:
        settings = load_settings()
    except Exception as exc:  # unsafe or invalid settings (a bad FRACTAL_APP too): say which, exit non-zero
        configure_logging(level="INFO", json=True)
        log.error("%s", describe_settings_error(exc))
        sys.exit(EXIT_BAD_CONFIG)
    configure_logging(level=settings.log_level, json=settings.log_json)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    role = settings.app
    argv = command_for(role)

    if settings.is_sqlite:
        log.info("SQLite database: not waiting")
    else:
        try:
            wait_for_database(settings.database_url, timeout_s=settings.db_wait_timeout_s)
        except TimeoutError as exc:
            log.error("giving up: %s", exc)
            sys.exit(EXIT_DATABASE_TIMEOUT)

    if settings.migrate:
        log.info("applying migrations (alembic upgrade head)")
        try:
            migrate(settings.database_url)
        except Exception as exc:  # scripts missing, a revision failing, a lock timeout: one line, own exit code
            log.error("migration failed: %s", _one_line(exc))
            sys.exit(EXIT_MIGRATION_FAILED)
        log.info("migrations at head")

    prepare_metrics_directory(role)
    log.info("starting %s: %s", role, " ".join(argv[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(ROOT)
    os.execv(argv[0], argv)  # noqa: S606 (a fixed argv, no shell: the server replaces this process)


if __name__ == "__main__":
    main()
