"""Configuration: file, environment, flags, Kestra files, and errors that name key and value."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.config import ConfigError, env_name, load, parse_size


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yml"
    path.write_text(text)
    return path


def test_defaults_serve_local_disk_on_localhost() -> None:
    config = load(environ={})
    assert config["server.host"] == "127.0.0.1"
    assert config["server.port"] == 8080
    assert config["storage.type"] == "local"
    assert config["storage.local.base-path"] == "./data"
    assert config["tenants.enabled"] is False
    assert config["tenants.default-tenant"] is True


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 9000\n  host: 0.0.0.0\nstorage:\n  type: memory\n")
    config = load(path, environ={"GATEWAY_SERVER_PORT": "9100"}, overrides={"server.host": "::1"})
    assert config["server.port"] == 9100
    assert config["server.host"] == "::1"
    assert config["storage.type"] == "memory"


def test_kestra_configuration_file_works_as_is(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
datasources:
  postgres:
    url: jdbc:postgresql://localhost:5432/kestra
kestra:
  repository:
    type: postgres
  storage:
    type: s3
    s3:
      bucket: kestra-bucket
      region: eu-west-1
      endpoint: http://minio:9000
      access-key: AKIA
      secret-key: s3cr3t
      forcePathStyle: true
  ee:
    tenants:
      enabled: true
      default-tenant: false
""",
    )
    config = load(path, environ={})
    assert config["storage.type"] == "s3"
    assert config["storage.s3.bucket"] == "kestra-bucket"
    assert config["storage.s3.endpoint"] == "http://minio:9000"
    assert config["storage.s3.force-path-style"] is True
    assert config["tenants.enabled"] is True
    assert config["tenants.default-tenant"] is False
    assert config.null_tenant_served is False


def test_kestra_minio_storage_becomes_s3(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "kestra:\n  storage:\n    type: minio\n    minio:\n      endpoint: minio\n"
        "      port: 9000\n      bucket: b\n      access-key: a\n      secret-key: s\n",
    )
    config = load(path, environ={})
    assert config["storage.type"] == "s3"
    assert config["storage.s3.endpoint"] == "http://minio:9000"
    assert config["storage.s3.force-path-style"] is True


def test_kestra_local_storage_base_path(tmp_path: Path) -> None:
    path = write(
        tmp_path, "kestra:\n  storage:\n    type: local\n    local:\n      base-path: /srv/k\n"
    )
    assert load(path, environ={})["storage.local.base-path"] == "/srv/k"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"GATEWAY_SERVER_PORT": "x"}, "Config 'server.port' has value 'x'"),
        ({"GATEWAY_SERVER_PORT": "70000"}, "Config 'server.port' has value '70000'"),
        ({"GATEWAY_STORAGE_TYPE": "ftp"}, "Config 'storage.type' has value 'ftp'"),
        ({"GATEWAY_TENANTS_ENABLED": "perhaps"}, "Config 'tenants.enabled' has value 'perhaps'"),
        ({"GATEWAY_TENANTS_IDS": "ok,Bad"}, "Config 'tenants.ids' has value 'Bad'"),
        ({"GATEWAY_STORAGE_TYPE": "s3"}, "Config 'storage.s3.bucket'"),
        ({"GATEWAY_LIMITS_MAX_OBJECT_SIZE": "lots"}, "Config 'limits.max-object-size'"),
    ],
)
def test_bad_value_names_the_key_and_the_value(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(environ=values)
    assert message in str(info.value)


def test_secret_values_are_not_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, "storage:\n  s3:\n    secret-key: [not, a, string]\n")
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert "not" not in str(info.value)
    assert "storage.s3.secret-key" in str(info.value)


def test_unknown_key_in_our_sections_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'server\.prot' is not a known key"):
        load(write(tmp_path, "server:\n  prot: 1\n"), environ={})


def test_invalid_yaml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(write(tmp_path, "server: [unclosed\n"), environ={})


def test_env_names() -> None:
    assert env_name("storage.s3.access-key") == "GATEWAY_STORAGE_S3_ACCESS_KEY"
    assert env_name("tenants.default-tenant") == "GATEWAY_TENANTS_DEFAULT_TENANT"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1024", 1024),
        ("64MiB", 64 * 2**20),
        ("5GiB", 5 * 2**30),
        ("5GB", 5 * 10**9),
        ("1kib", 1024),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size("k", text) == size


def test_serve_with_a_bad_value_exits_with_the_message(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["serve", "--config", str(write(tmp_path, "server:\n  port: x\n"))]
    )
    assert result.exit_code == 1
    assert "Config 'server.port' has value 'x'" in result.output


def test_config_command_lists_every_key() -> None:
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 0
    assert "storage.s3.force-path-style" in result.output
    assert "GATEWAY_TENANTS_DEFAULT_TENANT" in result.output
