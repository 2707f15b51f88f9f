"""Settings: read once from the environment, validated, then passed around explicitly."""

from __future__ import annotations

import enum
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The development signing key lives here (generated on first use by `./commands token`).
INSTANCE_DIR = Path("instance")
DEV_PRIVATE_KEY_PATH = INSTANCE_DIR / "dev_jwt_private.pem"
DEV_PUBLIC_KEY_PATH = INSTANCE_DIR / "dev_jwt_public.pem"
# Marker embedded as a PEM comment line in generated development keys, so production can refuse them.
DEV_KEY_MARKER = "fractal-development-key"


class Environment(enum.StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class CloudKind(enum.StrEnum):
    LOCAL = "local"
    AWS = "aws"


class MailBackend(enum.StrEnum):
    SMTP = "smtp"
    SES = "ses"


# What env.py can start (FRACTAL_APP): the three APIs under gunicorn, or the scaler loop.
APPS = ("public", "admin", "host", "scaler")


class UnsafeSettingsError(RuntimeError):
    """Raised at start-up when production is configured unsafely; names the setting."""


def normalise_database_url(url: str) -> str:
    """Force the psycopg2 driver: SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql:// URL."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


# REDIS_URL forms: one server (redis-py's from_url) or a Redis Cluster (every listed node can seed the topology).
REDIS_SCHEMES = ("redis", "rediss", "unix")
REDIS_CLUSTER_SCHEME = "redis+cluster"
REDIS_CLUSTER_TLS_SCHEME = "rediss+cluster"
REDIS_CLUSTER_FORM = "redis+cluster://[user:password@]host:port[,host:port...]"
REDIS_CLUSTER_TLS_FORM = "rediss+cluster://[user:password@]host:port[,...][?ssl_ca_certs=/path&ssl_cert_reqs=required]"
# What ssl_cert_reqs may say (redis-py's names); `required` is the default: a TLS cluster whose certificate is not
# checked is one an attacker on the path can stand in for.
REDIS_CERT_REQS = ("required", "optional", "none")


@dataclass(frozen=True)
class RedisClusterUrl:
    """A parsed ``redis+cluster://`` or ``rediss+cluster://`` (TLS) URL: the startup nodes, the credentials they
    share, and for TLS the CA bundle (None: the system's) and how strictly the nodes' certificates are checked."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: str = "required"


def is_redis_cluster_url(url: str) -> bool:
    return url.lower().startswith((REDIS_CLUSTER_SCHEME + "://", REDIS_CLUSTER_TLS_SCHEME + "://"))


def parse_redis_cluster_url(url: str) -> RedisClusterUrl:
    """The nodes and credentials of a ``redis+cluster://`` URL (Flask-Limiter's grammar), or of its TLS form
    ``rediss+cluster://`` (which alone takes ``ssl_ca_certs`` and ``ssl_cert_reqs``); ValueError says what is wrong
    without repeating the password."""
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    if scheme not in (REDIS_CLUSTER_SCHEME, REDIS_CLUSTER_TLS_SCHEME):
        raise ValueError(f"a Redis Cluster URL is {REDIS_CLUSTER_FORM} or {REDIS_CLUSTER_TLS_FORM}")
    tls = scheme == REDIS_CLUSTER_TLS_SCHEME
    form = REDIS_CLUSTER_TLS_FORM if tls else REDIS_CLUSTER_FORM
    credentials, _, locations = parsed.netloc.rpartition("@")
    if parsed.path not in ("", "/", "/0"):
        raise ValueError(f"a Redis Cluster has only database 0; write {form}")
    if parsed.fragment or (parsed.query and not tls):
        raise ValueError(f"a Redis Cluster URL takes no query or fragment; write {form}")
    options: dict[str, str] = {}
    for name, values in urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items():
        if name not in ("ssl_ca_certs", "ssl_cert_reqs") or len(values) != 1 or not values[0]:
            raise ValueError(f"{name[:40]!r}: a TLS Redis Cluster URL takes ssl_ca_certs and ssl_cert_reqs once each")
        options[name] = values[0]
    cert_reqs = options.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in REDIS_CERT_REQS:
        raise ValueError(f"ssl_cert_reqs is one of {', '.join(REDIS_CERT_REQS)}")
    ca_certs = options.get("ssl_ca_certs")
    if ca_certs is not None and not os.path.isfile(ca_certs):
        raise ValueError(f"ssl_ca_certs: no file {ca_certs[:200]!r}")
    nodes: list[tuple[str, int]] = []
    for location in locations.split(","):
        location = location.strip()
        try:
            node = urllib.parse.urlsplit(f"//{location}")
            host, port = node.hostname, node.port
        except ValueError:
            host = port = None
        if not location or not host or port is None or node.username is not None or port == 0:
            raise ValueError(f"{location!r} is not host:port (with a port); write {form}")
        nodes.append((host, port))
    username = password = None
    if credentials:
        user, has_password, secret = credentials.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if has_password else None
    return RedisClusterUrl(
        nodes=tuple(nodes),
        username=username,
        password=password,
        tls=tls,
        ssl_ca_certs=ca_certs,
        ssl_cert_reqs=cert_reqs,
    )


def validate_redis_url(url: str | None) -> str | None:
    """Refuse a REDIS_URL that no Redis client would understand, at start-up rather than on first use."""
    if url is None or not url.strip():
        return None
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in (REDIS_CLUSTER_SCHEME, REDIS_CLUSTER_TLS_SCHEME):
        parse_redis_cluster_url(url)
    elif scheme not in REDIS_SCHEMES:
        raise ValueError(
            f"unknown scheme {scheme + '://' if scheme else '(none)'}; use redis://host:port/db, rediss:// (TLS), "
            f"unix:///path, {REDIS_CLUSTER_FORM} or {REDIS_CLUSTER_TLS_FORM}"
        )
    return url


# The example configuration's placeholders (.env.example) all contain this; production refuses any value that does.
PLACEHOLDER_MARKER = "change-me"


def _has_placeholder(value: object) -> bool:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str):
        return PLACEHOLDER_MARKER in value.lower()
    if isinstance(value, list | tuple | set | frozenset):
        return any(_has_placeholder(item) for item in value)
    if isinstance(value, dict):
        return any(_has_placeholder(item) for item in value.values())
    return False


def _env_name(field: str) -> str:
    """The environment variable a Settings field is read from."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return "FRACTAL_" + field.upper()


class Settings(BaseSettings):
    """Every knob of Fractal; see ARCHITECTURE.md §3 for the contract."""

    model_config = SettingsConfigDict(env_prefix="FRACTAL_", extra="ignore", frozen=True)

    database_url: str = Field(
        default="sqlite:///instance/fractal.db",
        validation_alias=AliasChoices("DATABASE_URL", "database_url"),
    )
    db_pool_pre_ping: bool = False
    # The connection budget of one process (each gunicorn worker has its own pool): replicas x workers x
    # (pool_size + max_overflow) must stay under PgBouncer's or Postgres's limit. A request that finds the pool
    # exhausted waits db_pool_timeout_s at most, then answers 503 DATABASE_BUSY.
    db_pool_size: int = Field(default=10, ge=1, le=1000)
    db_max_overflow: int = Field(default=20, ge=0, le=1000)
    db_pool_timeout_s: float = Field(default=5, gt=0, le=60)
    # Bounds on every transaction (SET LOCAL at its start, so they survive PgBouncer's transaction pooling), well
    # under gunicorn's 30 s worker timeout: a held row lock or a runaway query answers 503 DATABASE_BUSY instead of
    # pinning a worker. 0 turns a bound off (Postgres's meaning).
    db_lock_timeout_ms: int = Field(default=3_000, ge=0)
    db_statement_timeout_ms: int = Field(default=10_000, ge=0)
    # A transaction left open while the process waits on something else (a hung client, a slow cloud call) is
    # ended by the server after this, releasing its locks.
    db_idle_in_transaction_timeout_ms: int = Field(default=20_000, ge=0)
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL", "redis_url"))
    # Every Redis key Fractal writes (limits, cache, nudges) starts with this, so deployments or test runs can
    # share one Redis server and clean up only their own keys.
    redis_prefix: str = Field(default="fractal:", min_length=1, max_length=64)
    env: Environment = Environment.DEVELOPMENT

    jwt_public_key: SecretStr | None = None
    jwks_url: str | None = None
    # How long a fetched key set is trusted: a key the issuer removes stops verifying tokens within this.
    jwks_lifetime_s: float = Field(default=600, gt=0)
    # An unknown kid refetches the set at once unless a fetch was attempted this recently (also how long a failed
    # fetch is remembered).
    jwks_refresh_cooldown_s: float = Field(default=5, ge=0)
    # The longest a request waits for the JWKS endpoint.
    jwks_timeout_s: float = Field(default=3, gt=0)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None

    cloud: CloudKind = CloudKind.LOCAL
    # An operator's allow-list of region names (comma-separated); unset, any well-formed name is allowed (the AWS
    # region form under FRACTAL_CLOUD=aws).
    regions: Annotated[list[str], NoDecode] = Field(default_factory=list)
    aws_subnet_id: str | None = None
    aws_security_group_ids: list[str] = Field(default_factory=list)
    aws_instance_profile: str | None = None
    aws_key_name: str | None = None

    max_mandelboxes_per_user: int = Field(default=1, ge=1)
    require_subscription: bool = False
    assign_rate_limit: str = "10 per minute"
    handshake_failure_rate_limit: str = "20 per minute"
    newsletter_rate_limit: str = "5 per minute"

    heartbeat_interval_s: float = Field(default=10, gt=0)
    host_timeout_s: float = Field(default=60, gt=0)
    connect_timeout_s: float = Field(default=90, gt=0)
    target_free_mandelboxes: int = Field(default=10, ge=0)
    boot_timeout_s: float = Field(default=900, gt=0)
    scale_down_delay_s: float = Field(default=300, ge=0)
    max_instances_per_region: int = Field(default=100, ge=0)
    host_api_url: str = "http://127.0.0.1:8002"
    scaler_interval_s: float = Field(default=15, gt=0)
    scaler_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # How many reverse proxies stand in front of the app: their X-Forwarded-For/-Proto/-Host are believed (that
    # many hops from the right), so per-address limits see the real client; 0 ignores the headers entirely.
    trusted_proxies: int = Field(default=0, ge=0, le=10)
    # Where gunicorn serves the public and host APIs' metrics (never on their own port); unset: not served.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # How long a scaler pass may hold the leadership lease: a SIGKILLed leader is replaced within this.
    scaler_lease_ttl_s: float = Field(default=60, gt=0)
    # Users refused NO_INSTANCE_AVAILABLE within this many seconds and not served since are retrying: the scaler
    # launches for them on top of the target (fractal.scaling.demand.waiting_users). 0 turns that off.
    scaler_waiting_window_s: float = Field(default=30, ge=0)
    # The scaler loop notes each completed pass here; `python env.py healthcheck` reads it (FRACTAL_APP=scaler).
    scaler_health_file: Path = Path("/tmp/fractal-scaler.health")  # noqa: S108 (a tmpfs in the image)
    local_boot_delay_s: float = Field(default=2, ge=0)

    idempotency_ttl_s: int = Field(default=24 * 3600, gt=0)
    # History retention (fractal.retention): how long ended things are kept before the scaler purges them. One
    # period for everything, each kind overridable; idempotency keys are counted from their expiry instead.
    retention_days: float = Field(default=90, gt=0)
    retention_events_days: float | None = Field(default=None, gt=0)
    retention_mandelboxes_days: float | None = Field(default=None, gt=0)
    retention_log_uploads_days: float | None = Field(default=None, gt=0)
    # Heartbeat rows of TERMINATED hosts, and (with their last mandelbox gone) the instance rows themselves.
    retention_heartbeats_days: float | None = Field(default=None, gt=0)
    retention_instances_days: float | None = Field(default=None, gt=0)
    # Expired idempotency keys are never replayed; by default they go as soon as they expire (assign also drops a few).
    retention_idempotency_keys_hours: float = Field(default=0, ge=0)
    # Whether a purged log-upload row's object is deleted from the bucket too (off: a bucket lifecycle rule does).
    retention_delete_log_objects: bool = True
    # The scaler purges at most this often (0: never on its own; `./commands purge` still works), in batches of
    # this many rows, each its own short transaction, and stops a run after purge_max_s (the rest waits).
    purge_interval_s: float = Field(default=600, ge=0)
    purge_batch_size: int = Field(default=2_000, ge=1, le=100_000)
    purge_max_s: float = Field(default=20, gt=0)
    # A pause after each full batch, so a long purge leaves the database room for requests (0: none).
    purge_pause_ms: int = Field(default=50, ge=0, le=10_000)

    cache_ttl_s: int = Field(default=30, ge=0)
    max_request_bytes: int = Field(default=1024 * 1024, gt=0)

    mail_backend: MailBackend = MailBackend.SMTP
    smtp_url: str = "smtp://127.0.0.1:1025"
    mail_from: str = "noreply@fractal.local"
    public_url: str = "http://127.0.0.1:8000"
    logs_bucket: str = "fractal-logs"
    max_log_bytes: int = Field(default=52_428_800, gt=0)
    # Per mandelbox, over its whole life: how many logs and how many stored bytes (after decompression) it may hold.
    log_uploads_per_mandelbox: int = Field(default=20, ge=1)
    log_bytes_per_mandelbox: int = Field(default=209_715_200, ge=1)
    # Uploads per sender (a host's instance, a user) across all its mandelboxes.
    log_upload_rate_limit: str = "10 per minute"
    secret_key: SecretStr = SecretStr("development-only-secret-key")

    log_level: str = "INFO"
    log_json: bool = True

    # The container start sequence (env.py): which process to run, how long to wait for the database, whether to
    # migrate first.
    app: str = "public"
    db_wait_timeout_s: float = Field(default=60, gt=0)
    migrate: bool = True

    @field_validator("database_url")
    @classmethod
    def _normalise_url(cls, value: str) -> str:
        return normalise_database_url(value)

    @field_validator("redis_url")
    @classmethod
    def _valid_redis_url(cls, value: str | None) -> str | None:
        return validate_redis_url(value)

    @field_validator("app")
    @classmethod
    def _known_app(cls, value: str) -> str:
        role = value.strip().lower()
        if role not in APPS:
            raise ValueError(f"FRACTAL_APP must be one of {', '.join(APPS)}, not {value!r}")
        return role

    @field_validator("aws_security_group_ids", "regions", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.env is not Environment.PRODUCTION:
            return self
        for name, value in self.model_dump().items():
            if _has_placeholder(value):
                raise UnsafeSettingsError(
                    f"{_env_name(name)}: production refuses the {PLACEHOLDER_MARKER!r} placeholder; set a real value"
                )
        if self.database_url.startswith("sqlite"):
            raise UnsafeSettingsError("DATABASE_URL: production refuses SQLite; point it at PostgreSQL")
        if self.jwt_public_key is None and not self.jwks_url:
            raise UnsafeSettingsError(
                "FRACTAL_JWT_PUBLIC_KEY / FRACTAL_JWKS_URL: production needs a key to verify user tokens"
            )
        if self.jwt_public_key is not None and DEV_KEY_MARKER in self.jwt_public_key.get_secret_value():
            raise UnsafeSettingsError("FRACTAL_JWT_PUBLIC_KEY: production refuses the development key")
        if not self.jwt_audience:
            raise UnsafeSettingsError("FRACTAL_JWT_AUDIENCE: required in production")
        if not self.jwt_issuer:
            raise UnsafeSettingsError("FRACTAL_JWT_ISSUER: required in production")
        if self.secret_key.get_secret_value() == "development-only-secret-key":
            raise UnsafeSettingsError("FRACTAL_SECRET_KEY: production refuses the development secret")
        if self.cloud is CloudKind.LOCAL:
            raise UnsafeSettingsError(
                "FRACTAL_CLOUD: production refuses 'local' (a simulated fleet must never receive real users); use aws"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def load_settings(**overrides: object) -> Settings:
    """Read the environment once; keyword overrides win (tests use them)."""
    return Settings(**overrides)  # type: ignore[arg-type]


def describe_settings_error(exc: Exception) -> str:
    """Why the settings were refused, in one line naming each variable (for start-up messages)."""
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{_variable('.'.join(str(part) for part in error['loc']))}: {error['msg']}" for error in exc.errors()
        )
        return f"invalid configuration: {problems}"
    return f"refusing to start: {exc}"


def _variable(field: str) -> str:
    if not field:
        return "settings"
    return field.upper() if field in ("database_url", "redis_url") else f"FRACTAL_{field.upper()}"


def load_settings_or_exit() -> Settings:
    """For process start-up: unsafe or invalid configuration ends the process with a message naming it."""
    try:
        return load_settings()
    except (UnsafeSettingsError, ValidationError) as exc:
        raise SystemExit(f"fractal: {describe_settings_error(exc)}") from None
