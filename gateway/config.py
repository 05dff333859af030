"""Configuration: one YAML file, then environment variables, then command-line flags.

Every key has a default, a type and a check; a bad value fails at start-up with a message
naming the key and the value (``Config 'server.port' has value 'x': ...``), never as a 404
later. A Kestra configuration file works as is: its ``kestra.storage.*`` and
``kestra.ee.tenants.*`` sections are read, the rest of it is ignored.

Environment variables: ``GATEWAY_`` + the key in upper case with ``.`` and ``-`` as ``_``
(``GATEWAY_STORAGE_S3_ACCESS_KEY``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import yaml

from backends.registry import BACKENDS

from .errors import InvalidTenant
from .keys import check_tenant_id


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and value."""


def _fail(key: str, value: object, expected: str) -> ConfigError:
    shown = "<hidden>" if "secret" in key or key.endswith("password") else repr(value)
    return ConfigError(f"Config {key!r} has value {shown}: {expected}")


def _to_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "yes", "on", "1"}:
        return True
    if text in {"false", "no", "off", "0"}:
        return False
    raise _fail(key, value, "expected true or false")


def _to_port(key: str, value: object) -> int:
    try:
        port = int(str(value), 10)
    except ValueError:
        raise _fail(key, value, "expected an integer from 0 to 65535") from None
    if not 0 <= port <= 65535:
        raise _fail(key, value, "expected an integer from 0 to 65535")
    return port


MAX_WORKERS: Final = 64


def _to_int_in(key: str, value: object, low: int, high: int, expected: str) -> int:
    try:
        number = int(str(value), 10)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise _fail(key, value, expected)
    return number


def _to_workers(key: str, value: object) -> int:
    return _to_int_in(key, value, 1, MAX_WORKERS, f"expected an integer from 1 to {MAX_WORKERS}")


_SIZE_RE: Final = re.compile(r"\s*(\d+)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)
_UNITS: Final = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(key: str, value: object) -> int:
    """Given ``1024``, ``"64MiB"`` or ``"5GB"``, return bytes; raise ``ConfigError``."""
    match = _SIZE_RE.fullmatch(str(value))
    if not match:
        raise _fail(key, value, "expected a size such as 1048576, 512MiB or 5GiB")
    number, unit = int(match[1]), (match[2] or "").lower()
    factor: int = 1024 ** ("kmgt".index(unit[0]) + 1) if "i" in unit else _UNITS[unit[:1]]
    return number * factor


def _to_str(key: str, value: object) -> str:
    if isinstance(value, (dict, list)):
        raise _fail(key, value, "expected a single value")
    return str(value)


def _to_storage_type(key: str, value: object) -> str:
    text = str(value).strip().lower()
    if text == "minio":  # Kestra's MinIO storage is S3 with another name
        return "s3"
    if text not in BACKENDS:
        raise _fail(key, value, f"expected one of {', '.join(sorted(BACKENDS))}")
    return text


def _to_ids(key: str, value: object) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise _fail(key, value, "expected a list of tenant ids")
    ids = tuple(str(item).strip() for item in items if str(item).strip())
    for tenant_id in ids:
        try:
            check_tenant_id(tenant_id)
        except InvalidTenant as exc:
            raise _fail(key, tenant_id, exc.message) from None
    return ids


def _to_positive(key: str, value: object) -> float:
    try:
        number = float(str(value))
    except ValueError:
        raise _fail(key, value, "expected a positive number of seconds") from None
    if number <= 0:
        raise _fail(key, value, "expected a positive number of seconds")
    return number


def _to_staleness(key: str, value: object) -> float:
    seconds = _to_positive(key, value)
    if seconds > 2:
        raise _fail(key, value, "expected at most 2 seconds")
    return seconds


MAX_ATTEMPTS: Final = 100_000


def _to_attempts(key: str, value: object) -> int:
    expected = f"expected an integer from 0 (no limit) to {MAX_ATTEMPTS}"
    return _to_int_in(key, value, 0, MAX_ATTEMPTS, expected)


def _to_size(key: str, value: object) -> int:
    size = parse_size(key, value)
    if size <= 0:
        raise _fail(key, value, "expected a size above zero")
    return size


@dataclass(frozen=True, slots=True)
class Option:
    key: str
    default: Any
    convert: Callable[[str, object], Any]
    help: str


OPTIONS: Final = MappingProxyType(
    {
        option.key: option
        for option in [
            Option("server.host", "127.0.0.1", _to_str, "Address to listen on."),
            Option("server.port", 8080, _to_port, "Port to listen on (0: any free port)."),
            Option(
                "server.workers",
                1,
                _to_workers,
                "Processes serving the one port (SO_REUSEPORT); up to one per CPU core.",
            ),
            Option(
                "server.shutdown-timeout",
                30.0,
                _to_positive,
                "Seconds SIGTERM waits for in-flight requests before aborting them.",
            ),
            Option(
                "server.read-timeout",
                60.0,
                _to_positive,
                "Seconds an upload may send nothing before it is aborted (408, nothing stored).",
            ),
            Option(
                "server.trust-proxy",
                False,
                _to_bool,
                "Believe X-Forwarded-Proto/-Host/-For from a reverse proxy (session cookie "
                "Secure; failed sign-ins counted per client).",
            ),
            Option(
                "limits.max-object-size",
                "5TiB",
                _to_size,
                "Largest accepted upload (413 above it); S3's own limit is 5 TiB.",
            ),
            Option("storage.type", "local", _to_storage_type, "local, s3 or memory."),
            Option("storage.local.base-path", "./data", _to_str, "Directory of the local backend."),
            Option(
                "storage.local.io-uring",
                True,
                _to_bool,
                "Small writes by io_uring where the kernel allows it (else worker threads).",
            ),
            Option(
                "storage.local.journal",
                True,
                _to_bool,
                "Small writes made durable by a journal (one flush for many writes) where"
                " io_uring serves them on a local disk; off: each write's file and directory"
                " are flushed. Every process sharing a base path must use the same setting.",
            ),
            Option("storage.s3.bucket", None, _to_str, "Bucket name (required for s3)."),
            Option("storage.s3.region", None, _to_str, "Region, e.g. us-east-1."),
            Option("storage.s3.endpoint", None, _to_str, "Endpoint URL for MinIO, Ceph, moto."),
            Option("storage.s3.access-key", None, _to_str, "Access key id."),
            Option("storage.s3.secret-key", None, _to_str, "Secret access key."),
            Option("storage.s3.path", "", _to_str, "Key prefix inside the bucket."),
            Option(
                "storage.s3.force-path-style", False, _to_bool, "Path-style URLs (MinIO, Ceph)."
            ),
            Option("tenants.enabled", False, _to_bool, "Serve named tenants /api/v1/{tenant}/."),
            Option(
                "tenants.default-tenant",
                True,
                _to_bool,
                "With tenants enabled, also serve the null tenant at /api/v1/.",
            ),
            Option(
                "tenants.ids",
                (),
                _to_ids,
                "Tenants to create at start when missing (the registry is the source of truth).",
            ),
            Option(
                "auth.enabled",
                True,
                _to_bool,
                "Require credentials (Basic or Bearer); false is logged as a warning at start.",
            ),
            Option(
                "auth.cache-seconds",
                1.0,
                _to_staleness,
                "How stale this process's copy of tenants, users and tokens may get (max 2).",
            ),
            Option(
                "auth.session-seconds",
                28800.0,
                _to_positive,
                "How long a web UI sign-in lasts (seconds from sign-in).",
            ),
            Option(
                "auth.sign-in-attempts",
                10,
                _to_attempts,
                "Failed password checks a client address may make per minute, then 429 "
                "(0: no limit).",
            ),
            Option("admin.username", None, _to_str, "Super admin created on first start."),
            Option(
                "admin.password",
                None,
                _to_str,
                "Its password; without one a random password is generated and shown once.",
            ),
            Option(
                "admin.password-file",
                "./gateway-admin-password.txt",
                _to_str,
                "Where a generated password is written (mode 0600).",
            ),
        ]
    }
)


@dataclass(frozen=True, slots=True)
class Config:
    """The checked configuration; ``values`` maps every key of ``OPTIONS`` to its value."""

    values: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def null_tenant_served(self) -> bool:
        return not self["tenants.enabled"] or self["tenants.default-tenant"]


def env_name(key: str) -> str:
    """Given ``storage.s3.access-key``, return ``GATEWAY_STORAGE_S3_ACCESS_KEY``."""
    return "GATEWAY_" + re.sub(r"[.-]", "_", key).upper()


def _kebab(name: str) -> str:
    """Given ``basePath`` or ``base_path``, return ``base-path`` (Micronaut's relaxed names)."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"-\1", name).replace("_", "-").lower()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{_kebab(str(name))}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


# Kestra's own keys, mapped onto ours; the rest of a Kestra file is not ours to read.
_KESTRA_KEYS: Final = MappingProxyType(
    {
        "kestra.storage.type": "storage.type",
        "kestra.storage.local.base-path": "storage.local.base-path",
        **{f"kestra.storage.s3.{k}": f"storage.s3.{k}" for k in (
            "bucket", "region", "endpoint", "access-key", "secret-key", "force-path-style"
        )},
        **{f"kestra.storage.minio.{k}": f"storage.s3.{k}" for k in (
            "bucket", "region", "access-key", "secret-key"
        )},
        "kestra.ee.tenants.enabled": "tenants.enabled",
        "kestra.ee.tenants.default-tenant": "tenants.default-tenant",
    }
)  # fmt: skip


def _from_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"Config file {str(path)!r} cannot be read: {exc.strerror}") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(tree, Mapping):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping at its top level")
    flat = _flatten(tree)
    values: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("kestra."):
            if key in _KESTRA_KEYS:
                values[_KESTRA_KEYS[key]] = value
        elif key in OPTIONS:
            values[key] = value
        elif key.split(".")[0] in {"server", "storage", "tenants", "limits", "auth", "admin"}:
            raise ConfigError(f"Config {key!r} is not a known key")
    _minio_endpoint(flat, values)
    return values


def _minio_endpoint(flat: Mapping[str, Any], values: dict[str, Any]) -> None:
    """Kestra's MinIO storage splits the endpoint into host, port and ``secure``."""
    host = flat.get("kestra.storage.minio.endpoint")
    if host is None:
        return
    host = str(host)
    if "://" not in host:
        secure = _to_bool(
            "kestra.storage.minio.secure", flat.get("kestra.storage.minio.secure", False)
        )
        host = ("https://" if secure else "http://") + host
        port = flat.get("kestra.storage.minio.port")
        if port is not None:
            host += f":{_to_port('kestra.storage.minio.port', port)}"
    values["storage.s3.endpoint"] = host
    values.setdefault("storage.s3.force-path-style", True)


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Given a YAML file (optional), the environment and flag values, return a ``Config``."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw.update(_from_file(Path(path)))
    env = os.environ if environ is None else environ
    for key in OPTIONS:
        if env_name(key) in env:
            raw[key] = env[env_name(key)]
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return check(raw)


def check(raw: Mapping[str, Any]) -> Config:
    """Given raw values by key, return the checked ``Config`` or raise ``ConfigError``."""
    unknown = set(raw) - set(OPTIONS)
    if unknown:
        raise ConfigError(f"Config {sorted(unknown)[0]!r} is not a known key")
    values = {}
    for key, option in OPTIONS.items():
        value = raw.get(key, option.default)
        values[key] = None if value is None else option.convert(key, value)
    if values["storage.type"] == "s3" and not values["storage.s3.bucket"]:
        raise _fail("storage.s3.bucket", None, "a bucket is required when storage.type is s3")
    return Config(MappingProxyType(values))
