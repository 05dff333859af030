"""moto in server mode: a real S3 endpoint over HTTP, in a subprocess, on a free local port.

The server and every client made here use throwaway credentials (``testing``/``testing``) given
explicitly, never taken from, or written to, the user's environment or ``~/.aws`` files.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any, Final

from tests.support.ports import free_port, listens_alone, process_tree

if TYPE_CHECKING:
    import pytest

ACCESS_KEY: Final = "testing"
SECRET_KEY: Final = "testing"
REGION: Final = "us-east-1"

# Given to the server (and usable for any other subprocess that talks to it): no real
# credentials, no config files, no instance-metadata look-ups.
AWS_ENV: Final[Mapping[str, str]] = MappingProxyType(
    {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)

START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 5.0

# ``python -m moto.server``, plus a watchdog: the server exits when its stdin (a pipe from
# this process) closes, so a test run that dies never leaves a server behind.
_SERVER_SCRIPT: Final = """
import os, sys, threading

def _exit_when_parent_goes():
    sys.stdin.buffer.read()
    os._exit(0)

threading.Thread(target=_exit_when_parent_goes, daemon=True).start()
from moto.server import main
main(["-H", sys.argv[1], "-p", sys.argv[2]])
"""

# urllib honours HTTP(S)_PROXY; a local test server must be reached directly.
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Given extra variables, return this process's environment minus every ``AWS_*`` variable,
    plus ``AWS_ENV`` and the extras."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENV)
    if extra:
        env.update(extra)
    return env


class MotoServer:
    """``python -m moto.server`` in a subprocess on a free port of 127.0.0.1.

    Parameters
    ----------
    env:
        Extra environment for the server, e.g. ``{"INITIAL_NO_AUTH_ACTION_COUNT": "0"}`` to make
        it check credentials (by default moto accepts any).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._extra_env = dict(env or {})
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.endpoint: str | None = None

    def start(self) -> str:
        """Start the server, wait until it answers, and return its endpoint URL."""
        if self.endpoint is not None:
            return self.endpoint
        last_error = ""
        for _ in range(3):  # the free port may be taken between probing and binding
            port = free_port()
            endpoint = f"http://127.0.0.1:{port}"
            # Lives as long as the server (closed in _terminate), so no `with`.
            self._log = tempfile.TemporaryFile(prefix="moto-server-")  # noqa: SIM115
            self._process = subprocess.Popen(
                [sys.executable, "-c", _SERVER_SCRIPT, "127.0.0.1", str(port)],
                env=clean_env(self._extra_env),
                stdin=subprocess.PIPE,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
            if self._wait_until_up(endpoint, port):
                self.endpoint = endpoint
                return endpoint
            last_error = self._log_tail()
            self._terminate()
        raise RuntimeError(f"moto server did not start:\n{last_error}")

    def reset(self) -> None:
        """Forget every bucket and object (moto's ``POST /moto-api/reset``)."""
        if self.endpoint is None:
            raise RuntimeError("moto server is not running")
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        with _OPENER.open(request, timeout=10) as response:
            response.read()

    def stop(self) -> None:
        """Stop the server (terminate, then kill if it lingers); safe to call twice."""
        self._terminate()
        self.endpoint = None

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_until_up(self, endpoint: str, port: int) -> bool:
        """Whether the server came up on ``port`` alone (``ports.listens_alone``: another
        process's server there would answer until this one exits on its failed bind)."""
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with _OPENER.open(f"{endpoint}/moto-api/data.json", timeout=1) as response:
                    response.read()
                alone = listens_alone(port, process_tree(self._process.pid))
                if alone is not None:
                    return alone
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-4000:].decode(errors="replace")

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.stdin is not None:
            process.stdin.close()
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None


def isolate_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """For one test, replace every ``AWS_*`` variable of this process with ``AWS_ENV``.

    Clients that read the environment (s3fs, aiobotocore) then never see the user's profile,
    config files or instance metadata; monkeypatch restores the environment afterwards.
    """
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    # botocore honours HTTP(S)_PROXY too: the local server must be reached directly.
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@functools.cache
def _session() -> Any:
    """Return one boto3 session with the test credentials and no config files (sessions are
    slow to make, so there is one)."""
    import boto3
    import botocore.session

    # (name in config file, environment variable, default, converter): read from neither the
    # environment (AWS_PROFILE, AWS_CONFIG_FILE, ...) nor the user's files.
    core = botocore.session.Session(
        session_vars={
            "profile": (None, None, None, None),
            "config_file": (None, None, os.devnull, None),
            "credentials_file": (None, None, os.devnull, None),
        }
    )
    return boto3.session.Session(
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        botocore_session=core,
    )


def s3_client(endpoint: str, *, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Any:
    """Given a moto endpoint, return a boto3 S3 client for it (path-style, test credentials)."""
    from botocore.config import Config

    return _session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def make_bucket(endpoint: str, name: str) -> None:
    """Create the bucket ``name`` on the S3 endpoint."""
    client = s3_client(endpoint)
    try:
        client.create_bucket(Bucket=name)
    finally:
        client.close()
