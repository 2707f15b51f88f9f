# Fractal control plane: one image for the public, admin and host APIs and the scaler (FRACTAL_APP picks one).
# No `# syntax=` line: BuildKit would fetch that frontend from a registry, and offline builds would fail.
# PYTHON_IMAGE is any Debian-based image with python (and its venv module); `./commands image-test` passes one
# made from Debian's own packages.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- build: install the locked dependencies, then the package, into a virtualenv (wheels only: nothing compiled) ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# requirements.lock pins every runtime dependency with its hashes (uv, universal; `./commands lock` regenerates it):
# pip refuses any file whose hash is not listed, and nothing unlisted is installed.
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --require-hashes --only-binary=:all: --no-deps -r requirements.lock
COPY pyproject.toml README.md LICENSE ./
COPY fractal ./fractal
# A real (non-editable) install of the package alone (its dependencies are all in place: `pip check` proves it);
# the package lands in site-packages; the migrations stay at /app (runtime stage).
RUN /opt/venv/bin/pip install --no-deps --only-binary=:all: . \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip uninstall -y pip setuptools wheel

# --- runtime: the virtualenv, the root shells and migrations; no compilers, no pip, no root ---
FROM ${PYTHON_IMAGE} AS runtime
# FRACTAL_ALEMBIC_INI: where the migrations are (they are not in the wheel); env.py also finds them beside itself.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FRACTAL_APP=public \
    FRACTAL_ALEMBIC_INI=/app/alembic.ini \
    GUNICORN_BIND=0.0.0.0:8000 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
RUN groupadd --system --gid 10001 fractal \
    && useradd --system --uid 10001 --gid fractal --home-dir /app --shell /usr/sbin/nologin fractal
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --chown=root:root app.py admin_app.py host_service_app.py env.py gunicorn.conf.py alembic.ini ./
COPY --chown=root:root alembic ./alembic
# instance/ holds the development signing key (FRACTAL_ENV=development only); everything else is read-only.
# /tmp/prometheus is made here for `docker run` without a tmpfs; under a tmpfs /tmp env.py makes it again.
RUN mkdir -p /app/instance /tmp/prometheus && chown fractal:fractal /app/instance /tmp/prometheus
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["python", "env.py", "healthcheck"]
STOPSIGNAL SIGTERM
CMD ["python", "env.py"]
