"""Settings: defaults, URL normalisation, and production refusing unsafe configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fractal.auth.dev_keys import generate_keypair
from fractal.config import (
    DEV_KEY_MARKER,
    RedisClusterUrl,
    Settings,
    UnsafeSettingsError,
    normalise_database_url,
    parse_redis_cluster_url,
)

SAFE_PRODUCTION = {
    "env": "production",
    "database_url": "postgresql://fractal@db/fractal",
    "jwt_audience": "fractal",
    "jwt_issuer": "https://issuer.example/",
    "secret_key": "a-real-secret",
    "cloud": "aws",
}

# The same, as a process sees it; each refusal test below changes one variable.
SAFE_PRODUCTION_ENV = {
    "PATH": "/usr/bin:/bin",
    "FRACTAL_ENV": "production",
    "DATABASE_URL": "postgresql://fractal:a-real-password@db/fractal",
    "FRACTAL_JWKS_URL": "https://issuer.example/jwks.json",
    "FRACTAL_JWT_AUDIENCE": "fractal",
    "FRACTAL_JWT_ISSUER": "https://issuer.example/",
    "FRACTAL_SECRET_KEY": "a-real-secret",
    "FRACTAL_CLOUD": "aws",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "REDIS_URL", "FRACTAL_ENV", "FRACTAL_CLOUD"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.database_url == "sqlite:///instance/fractal.db"
    assert settings.redis_url is None
    assert settings.env == "development"
    assert settings.cloud == "local"
    assert settings.max_mandelboxes_per_user == 1
    assert settings.assign_rate_limit == "10 per minute"
    assert (settings.heartbeat_interval_s, settings.host_timeout_s, settings.connect_timeout_s) == (10, 60, 90)
    assert settings.target_free_mandelboxes == 10
    assert settings.boot_timeout_s == 900 and settings.scale_down_delay_s == 300
    assert settings.max_instances_per_region == 100
    assert settings.host_api_url == "http://127.0.0.1:8002"


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@h:5432/d")
    monkeypatch.setenv("FRACTAL_MAX_MANDELBOXES_PER_USER", "3")
    monkeypatch.setenv("FRACTAL_REQUIRE_SUBSCRIPTION", "true")
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg2://u:p@h:5432/d"
    assert settings.max_mandelboxes_per_user == 3
    assert settings.require_subscription is True


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://a/b", "postgresql+psycopg2://a/b"),
        ("postgresql://a/b", "postgresql+psycopg2://a/b"),
        ("postgresql+psycopg2://a/b", "postgresql+psycopg2://a/b"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_database_urls_are_normalised_to_psycopg2(url: str, expected: str) -> None:
    assert normalise_database_url(url) == expected


def test_safe_production_settings_are_accepted() -> None:
    Settings(**SAFE_PRODUCTION, jwks_url="https://issuer.example/.well-known/jwks.json")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"database_url": "sqlite:///instance/fractal.db"}, "DATABASE_URL"),
        ({"jwt_audience": None}, "FRACTAL_JWT_AUDIENCE"),
        ({"jwt_issuer": None}, "FRACTAL_JWT_ISSUER"),
        ({"jwks_url": None}, "FRACTAL_JWT_PUBLIC_KEY"),
        ({"jwks_url": None, "jwt_public_key": f"{DEV_KEY_MARKER}\n{generate_keypair().public_pem}"}, "development key"),
        ({"secret_key": "development-only-secret-key"}, "FRACTAL_SECRET_KEY"),
        ({"cloud": "local"}, "FRACTAL_CLOUD"),
        ({"database_url": "postgresql://fractal:change-me@postgres:5432/fractal"}, "DATABASE_URL"),
        ({"secret_key": "change-me-to-a-long-random-string"}, "FRACTAL_SECRET_KEY"),
        ({"secret_key": "CHANGE-ME"}, "FRACTAL_SECRET_KEY"),
        ({"smtp_url": "smtp://fractal:change-me@smtp.example:587"}, "FRACTAL_SMTP_URL"),
        ({"redis_url": "redis://:change-me@redis:6379/0"}, "REDIS_URL"),
        ({"jwks_url": "https://change-me.example/.well-known/jwks.json"}, "FRACTAL_JWKS_URL"),
        ({"public_url": "https://change-me.example"}, "FRACTAL_PUBLIC_URL"),
        ({"aws_security_group_ids": ["sg-1", "sg-change-me"]}, "FRACTAL_AWS_SECURITY_GROUP_IDS"),
    ],
)
def test_production_refuses_unsafe_settings(change: dict[str, object], named: str) -> None:
    values = {**SAFE_PRODUCTION, "jwks_url": "https://issuer.example/jwks.json", **change}
    with pytest.raises(UnsafeSettingsError, match=named):
        Settings(**values)


def test_production_process_exits_non_zero_naming_the_setting(tmp_path: object) -> None:
    env = {"FRACTAL_ENV": "production", "PATH": "/usr/bin:/bin", "DATABASE_URL": "sqlite:///x.db"}
    result = subprocess.run(
        [sys.executable, "-c", "import app"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "refusing to start" in result.stderr and "DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_values_exit_naming_the_variable() -> None:
    env = {"PATH": "/usr/bin:/bin", "FRACTAL_MAX_MANDELBOXES_PER_USER": "lots"}
    result = subprocess.run(
        [sys.executable, "-c", "import app"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "MAX_MANDELBOXES_PER_USER" in result.stderr


def test_placeholders_and_the_simulated_fleet_are_fine_outside_production() -> None:
    settings = Settings(env="development", cloud="local", secret_key="change-me", database_url="sqlite:///x.db")
    assert settings.cloud == "local"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"FRACTAL_CLOUD": "local"}, "FRACTAL_CLOUD"),
        ({"DATABASE_URL": "postgresql://fractal:change-me@postgres:5432/fractal"}, "DATABASE_URL"),
        ({"FRACTAL_SMTP_URL": "smtp://u:change-me@mail:587"}, "FRACTAL_SMTP_URL"),
        ({"FRACTAL_SECRET_KEY": "development-only-secret-key"}, "FRACTAL_SECRET_KEY"),
    ],
)
def test_production_start_up_refuses_each_unsafe_setting_naming_it(env: dict[str, str], named: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import app"],
        env={**SAFE_PRODUCTION_ENV, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "refusing to start" in result.stderr and named in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "a-real-password" not in result.stderr


def test_the_safe_production_environment_starts() -> None:
    """The control for the refusals above: the same environment without the unsafe value imports the app."""
    result = subprocess.run(
        [sys.executable, "-c", "import app"],
        env=SAFE_PRODUCTION_ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis+cluster://10.0.0.1:7000", RedisClusterUrl(nodes=(("10.0.0.1", 7000),))),
        (
            "redis+cluster://cache-a:6379,cache-b:6380/",
            RedisClusterUrl(nodes=(("cache-a", 6379), ("cache-b", 6380))),
        ),
        ("redis+cluster://:p%40ss@h:1/0", RedisClusterUrl(nodes=(("h", 1),), password="p@ss")),
        ("redis+cluster://fractal:pw@h:1,[::1]:2", RedisClusterUrl((("h", 1), ("::1", 2)), "fractal", "pw")),
    ],
)
def test_redis_cluster_urls_name_their_nodes(url: str, expected: RedisClusterUrl) -> None:
    assert parse_redis_cluster_url(url) == expected
    assert Settings(redis_url=url).redis_url == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://cache-a", "'cache-a' is not host:port"),
        ("redis+cluster://", "is not host:port"),
        ("redis+cluster://a:1,,b:2", "'' is not host:port"),
        ("redis+cluster://a:port", "'a:port' is not host:port"),
        ("redis+cluster://a:99999", "is not host:port"),
        ("redis+cluster://a:1/2", "only database 0"),
        ("redis+cluster://a:1?read_from_replicas=1", "no query"),
        ("redis-cluster://a:1,b:2", "unknown scheme"),
        ("cache-a:6379", "unknown scheme"),
    ],
)
def test_bad_redis_urls_are_refused_naming_the_form(url: str, says: str) -> None:
    with pytest.raises(ValueError, match="redis_url") as refused:
        Settings(redis_url=url)
    assert says in str(refused.value) and "redis+cluster://[user:password@]host:port[,host:port...]" in str(
        refused.value
    )


def test_tls_cluster_urls_take_a_ca_bundle_and_check_certificates_by_default(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until the client connects")
    assert parse_redis_cluster_url("rediss+cluster://:pw@a:1,b:2") == RedisClusterUrl(
        (("a", 1), ("b", 2)), password="pw", tls=True, ssl_ca_certs=None, ssl_cert_reqs="required"
    )
    url = f"rediss+cluster://a:1?ssl_ca_certs={ca}&ssl_cert_reqs=optional"
    assert parse_redis_cluster_url(url) == RedisClusterUrl((("a", 1),), tls=True, ssl_ca_certs=str(ca),
                                                           ssl_cert_reqs="optional")  # fmt: skip
    assert Settings(redis_url=url).redis_url == url


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("ssl_ca_certs=/no/such/ca.pem", "ssl_ca_certs: no file '/no/such/ca.pem'"),
        ("ssl_cert_reqs=maybe", "ssl_cert_reqs is one of required, optional, none"),
        ("ssl_cert_reqs=none&ssl_cert_reqs=required", "takes ssl_ca_certs and ssl_cert_reqs once each"),
        ("ssl_ca_certs=", "takes ssl_ca_certs and ssl_cert_reqs once each"),
        ("read_from_replicas=1", "'read_from_replicas': a TLS Redis Cluster URL takes"),
    ],
)
def test_bad_tls_cluster_options_are_refused(query: str, says: str) -> None:
    with pytest.raises(ValueError, match="redis_url") as refused:
        Settings(redis_url=f"rediss+cluster://:secret-pw@a:1,b:2?{query}")
    assert says in str(refused.value) and "secret-pw" not in str(refused.value)


def test_a_bad_cluster_url_stops_start_up_naming_the_variable_without_the_password() -> None:
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": "redis+cluster://:a-real-password@cache-a:6379,cache-b"}
    result = subprocess.run(
        [sys.executable, "-c", "import app"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "REDIS_URL" in result.stderr and "'cache-b' is not host:port" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "a-real-password" not in result.stderr
