"""The deployment files agree with the gateway and with each other (no Docker needed).

``docker-compose.yml`` is read with PyYAML, ``Dockerfile`` as text: every ``GATEWAY_*``
variable the gateway service receives is a real configuration key, its literal values pass
``gateway.config.check``, the gateway waits for a healthy MinIO and a finished bucket job,
talks to the MinIO service on its port, uses the bucket the job creates, and no admin or
storage password has a default anywhere.
"""

from __future__ import annotations

import json
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import OPTIONS, check, env_name

ROOT: Final = Path(__file__).resolve().parent.parent
COMPOSE: Final = ROOT / "docker-compose.yml"
DOCKERFILE: Final = ROOT / "Dockerfile"
NGINX: Final = ROOT / "deploy" / "nginx.conf"

ENV_KEYS: Final = {env_name(key): key for key in OPTIONS}
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
SUBSTITUTION: Final = re.compile(r"(?<!\$)\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
REQUIRED: Final = re.compile(r"^\$\{\w+:\?[^}]+\}$")
SECRET_NAME: Final = re.compile(r"PASSWORD|SECRET", re.IGNORECASE)


@cache
def compose() -> dict[str, Any]:
    tree = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(tree, dict)
    return tree


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"no {name!r} service in docker-compose.yml"
    result: dict[str, Any] = services[name]
    return result


def environment(name: str) -> dict[str, str]:
    """The service's environment as a mapping (compose allows a list of NAME=value too)."""
    env = service(name).get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def interpolate(value: str) -> str:
    """What compose makes of ``value`` for the check: a default stands in for its variable,
    a required variable gets a placeholder, ``$$`` becomes ``$``."""

    def replace(match: re.Match[str]) -> str:
        op = match["op"] or ""
        if op.endswith("-"):
            return match["arg"]
        return f"placeholder-{match['name'].lower()}"

    return SUBSTITUTION.sub(replace, value).replace("$$", "$")


def is_literal(value: str) -> bool:
    return SUBSTITUTION.search(value) is None


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            result.append((instruction.upper(), rest.strip()))
    return result


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def exec_form(rest: str) -> list[str]:
    """Arguments of CMD/ENTRYPOINT, exec form (JSON) or shell form."""
    if rest.startswith("["):
        parsed = json.loads(rest)
        assert isinstance(parsed, list)
        return [str(item) for item in parsed]
    return ["/bin/sh", "-c", rest]


def gateway_config() -> Any:
    """The gateway service's configuration: Dockerfile ENV, then the compose environment."""
    raw: dict[str, Any] = {}
    merged = {**dockerfile_env(), **environment("gateway")}
    for name, value in merged.items():
        if name in ENV_KEYS:
            raw[ENV_KEYS[name]] = interpolate(value)
    return check(raw)


# -- docker-compose.yml --------------------------------------------------------------------


def test_every_gateway_variable_is_a_real_key() -> None:
    env = environment("gateway")
    unknown = [name for name in env if name.startswith("GATEWAY_") and name not in ENV_KEYS]
    assert unknown == [], f"not configuration keys: {unknown}"
    assert "GATEWAY_STORAGE_TYPE" in env


def test_literal_values_pass_the_config_check() -> None:
    env = environment("gateway")
    literal = {ENV_KEYS[n]: v for n, v in env.items() if n in ENV_KEYS and is_literal(v)}
    assert literal, "no literal settings at all?"
    check(literal)  # raises ConfigError naming the key and the value
    config = gateway_config()  # the whole of it, with placeholders for required variables
    assert config["storage.type"] == "s3"
    assert config["storage.s3.force-path-style"] is True
    assert config["storage.s3.region"]
    assert config["tenants.enabled"] is True
    assert config["auth.enabled"] is True
    assert config["server.host"] == "0.0.0.0"


def test_the_gateway_waits_for_minio_and_the_bucket() -> None:
    depends = service("gateway")["depends_on"]
    assert isinstance(depends, dict), "depends_on needs conditions (the long form)"
    assert depends["minio"]["condition"] == "service_healthy"
    assert depends["createbucket"]["condition"] == "service_completed_successfully"
    job = service("createbucket")
    assert job["depends_on"]["minio"]["condition"] == "service_healthy"
    assert str(job.get("restart", "no")) == "no", "a one-shot job must not restart"


def minio_api_port() -> int:
    command = service("minio")["command"]
    args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    assert args[0] == "server" and "/data" in args
    if "--address" in args:
        return int(args[args.index("--address") + 1].rsplit(":", 1)[1])
    return 9000  # MinIO's default


def test_the_endpoint_names_the_minio_service_and_its_port() -> None:
    endpoint = urlsplit(gateway_config()["storage.s3.endpoint"])
    assert endpoint.scheme == "http"
    assert endpoint.hostname == "minio"
    assert endpoint.hostname in compose()["services"]
    assert endpoint.port == minio_api_port() == 9000
    volumes = [str(v) for v in service("minio").get("volumes", [])]
    assert any(v.endswith(":/data") for v in volumes), "MinIO's data needs a volume"
    for volume in volumes:
        name = volume.split(":", 1)[0]
        if not name.startswith((".", "/")):
            assert name in (compose().get("volumes") or {}), f"volume {name!r} not declared"


def test_the_bucket_job_creates_the_bucket_the_gateway_uses() -> None:
    bucket = gateway_config()["storage.s3.bucket"]
    assert bucket and is_literal(bucket)
    job = service("createbucket")
    assert str(job["image"]).startswith("minio/mc")
    env = environment("createbucket")
    command = job["command"]
    script = " ".join(command) if isinstance(command, list) else str(command)
    # The shell in the container expands ${NAME} / $NAME from the job's environment.
    script = script.replace("$$", "$")
    script = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], m[0]), script)
    alias = re.search(r"mc alias set (\S+) (\S+)", script)
    assert alias is not None, script
    assert urlsplit(alias[2]).hostname == "minio"
    assert urlsplit(alias[2]).port == minio_api_port()
    made = re.search(r"mc mb (?:--\S+ )*\"?" + re.escape(alias[1]) + r"/([^\"\s]+)", script)
    assert made is not None, script
    assert made[1] == bucket


def test_healthchecks() -> None:
    for name in ("minio", "gateway"):
        test = service(name).get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"
    gateway_test = " ".join(service("gateway")["healthcheck"]["test"])
    port = gateway_config()["server.port"]
    assert f"127.0.0.1:{port}/health/ready" in gateway_test
    assert any(i == "HEALTHCHECK" and "/health/ready" in r for i, r in dockerfile_instructions())


def test_no_default_password_anywhere() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    for match in SUBSTITUTION.finditer(text):
        if SECRET_NAME.search(match["name"]):
            assert match["op"] == ":?", f"{match[0]}: a secret must be required, not defaulted"
    for name in ("gateway", "minio", "createbucket"):
        for variable, value in environment(name).items():
            if SECRET_NAME.search(variable):
                assert REQUIRED.fullmatch(value), f"{name}: {variable}={value!r} is hard-coded"
    assert "GATEWAY_ADMIN_PASSWORD" in environment("gateway")
    assert environment("gateway").get("GATEWAY_ADMIN_PASSWORD_FILE") is None
    for path in (DOCKERFILE, NGINX):
        assert not re.search(r"PASSWORD\s*[=:]", path.read_text(encoding="utf-8"), re.I)


def test_one_published_port_for_any_number_of_gateways() -> None:
    # `--scale gateway=3` cannot publish one host port three times: the gateway only exposes
    # its port, and the load balancer publishes one.
    gateway = service("gateway")
    assert "ports" not in gateway
    assert "container_name" not in gateway
    port = gateway_config()["server.port"]
    assert str(port) in [str(p) for p in gateway.get("expose", [])]
    balancer = service("lb")
    assert balancer["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert any(str(v).startswith("./deploy/nginx.conf:") for v in balancer["volumes"])
    published = [str(p) for p in balancer["ports"]]
    assert len(published) == 1
    nginx = NGINX.read_text(encoding="utf-8")
    listen = re.search(r"listen\s+(\d+);", nginx)
    assert listen is not None and published[0].endswith(f":{listen[1]}")
    assert f"http://gateway:{port}" in nginx
    assert "client_max_body_size 0;" in nginx  # uploads of any size reach the gateway
    # Only the balancer reaches the gateways, and it tells them the client's address: failed
    # sign-ins are then counted per client, not all against the balancer (gateway.guard).
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in nginx
    assert gateway_config()["server.trust-proxy"] is True


# -- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_runs_gateway_serve_as_a_user_on_the_configured_port() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    command: list[str] = []
    for instruction, rest in instructions:
        if instruction in ("ENTRYPOINT", "CMD"):
            command += exec_form(rest)
    assert command[:2] == ["gateway", "serve"], command
    env = dockerfile_env()
    assert env["GATEWAY_SERVER_HOST"] == "0.0.0.0"
    port = int(env.get("GATEWAY_SERVER_PORT", OPTIONS["server.port"].default))
    exposed = [rest.split("/")[0] for instruction, rest in instructions if instruction == "EXPOSE"]
    assert exposed == [str(port)]
    assert gateway_config()["server.port"] == port
    users = [rest for instruction, rest in instructions if instruction == "USER"]
    assert users and users[-1] not in ("root", "0"), "the gateway must not run as root"
    assert any(i == "RUN" and re.search(r"pip install \.", r) for i, r in instructions)
    for name in env:
        if name.startswith("GATEWAY_"):
            assert name in ENV_KEYS, f"{name} is not a configuration key"


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "*" in lines
    for needed in ("pyproject.toml", "README.md", "gateway/", "backends/"):
        assert f"!{needed}" in lines
    for instruction, rest in dockerfile_instructions():
        if instruction == "COPY":
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
                top = source.split("/")[0]
                assert f"!{top}" in lines or f"!{top}/" in lines, f"{source} is ignored"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${X:?set it}", "placeholder-x"),
        ("${X:-8080}", "8080"),
        ("a$${B}", "a${B}"),
        ("plain", "plain"),
    ],
)
def test_interpolate(value: str, expected: str) -> None:
    assert interpolate(value) == expected
