"""The real gateway in a subprocess: ``gateway serve --config FILE`` on a free local port.

For end-to-end tests that must talk to the gateway as a deployed process (raw sockets,
signals, restarts, several replicas over one storage). ``GatewayProcess(config)`` writes the
configuration as YAML into a temporary directory, starts ``python -m gateway serve`` on
127.0.0.1 and a free port, waits for ``GET /health/ready`` to answer 200, and keeps the
process's output in a log file (``log_path``, ``log_text()``) to show when something fails.

Example::

    with GatewayProcess({"storage": {"type": "memory"}}) as gateway:
        urllib.request.urlopen(gateway.url + "/health/live")

The configuration may be nested (``{"storage": {"type": "local"}}``) or use dotted keys
(``{"storage.type": "local"}``), or both; ``server.host`` and ``server.port`` are always set
here. Inherited ``GATEWAY_*`` variables are dropped so the caller's shell cannot change the
configuration under test; ``env`` adds variables (and may set ``GATEWAY_*`` ones on purpose).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final

import yaml

from tests.support.ports import HOST, free_port, listens_alone, process_tree

START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 15.0

# AWS SDKs read credentials and settings from the environment and from files in $HOME; a
# gateway under test takes them from its configuration only.
QUIET_AWS_ENV: Final[Mapping[str, str]] = {
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}

# urllib honours HTTP(S)_PROXY; a local test server must be reached directly.
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def nested(config: Mapping[str, Any]) -> dict[str, Any]:
    """Given a configuration with nested and/or dotted keys, return it fully nested."""
    tree: dict[str, Any] = {}
    for name, value in config.items():
        parts = str(name).split(".")
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"config key {name!r} conflicts with a value at {part!r}")
            node = child
        leaf = parts[-1]
        if isinstance(value, Mapping):
            existing = node.setdefault(leaf, {})
            if not isinstance(existing, dict):
                raise ValueError(f"config key {name!r} conflicts with a value")
            _merge(existing, nested(value))
        else:
            node[leaf] = value
    return tree


def _merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


class GatewayProcess:
    """``python -m gateway serve --config FILE`` in a subprocess, on a free port of 127.0.0.1.

    Parameters
    ----------
    config:
        The configuration (nested or dotted keys); written as YAML. ``server.host`` and
        ``server.port`` are chosen here and override what ``config`` says.
    env:
        Extra environment variables for the process (added after inherited ``GATEWAY_*``
        variables have been removed).
    workdir:
        Where to write the configuration and the log (default: a new temporary directory,
        removed by ``stop``).
    args:
        Extra command-line arguments after ``serve --config FILE`` (flags override the file).
    start_timeout:
        Seconds to wait for ``/health/ready`` to answer 200.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        env: Mapping[str, str] | None = None,
        *,
        workdir: str | os.PathLike[str] | None = None,
        args: Sequence[str] = (),
        start_timeout: float = START_TIMEOUT,
        ready_path: str = "/health/ready",
    ) -> None:
        self.config = nested(config)
        self.args = list(args)
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.ready_path = ready_path
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.url: str | None = None
        self.returncode: int | None = None
        self.log_path: Path | None = None
        self._log: IO[bytes] | None = None
        self._final_log = ""

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> str:
        """Start the gateway, wait until it is ready, and return its base URL."""
        if self.url is not None:
            return self.url
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="gateway-process-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "gateway.log"
        for attempt in range(3):  # the free port may be taken between probing and binding
            port = free_port()
            config_path = self._write_config(port)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in _terminate)
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--config",
                    str(config_path),
                    *self.args,
                ],
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
            atexit.register(self._terminate)
            url = f"http://{HOST}:{port}"
            ready = self._wait_ready(url, port)
            if ready:
                self.port, self.url = port, url
                return url
            exited = self.process.poll() is not None
            self._terminate()
            # Alive but not ready: another port will not help (unless another process has
            # this one: ready is None then).
            if (not exited and ready is not None) or attempt == 2:
                break
        log = self.log_text()
        self._remove_workdir()
        raise RuntimeError(f"the gateway did not become ready:\n{log[-4000:]}")

    def stop(self) -> int | None:
        """Send SIGTERM, wait for the process to exit (kill it if it lingers); return its code.

        Safe to call twice. Removes the temporary working directory if this object made it.
        """
        self._terminate()
        self.url = None
        self.port = None
        self._remove_workdir()
        return self.returncode

    def __enter__(self) -> GatewayProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers -------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """Return the environment the process runs with."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(QUIET_AWS_ENV)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def log_text(self) -> str:
        """Return what the process wrote to stdout and stderr (still available after ``stop``)."""
        if self.log_path is None or not self.log_path.exists():
            return self._final_log
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _write_config(self, port: int) -> Path:
        assert self.workdir is not None
        config = nested(self.config)
        _merge(config, {"server": {"host": HOST, "port": port}})
        path = self.workdir / "gateway.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=True), encoding="utf-8")
        return path

    def _wait_ready(self, url: str, port: int) -> bool | None:
        """True once the process answers 200 at ``ready_path``; False if it exits or the
        time is up; None if another process listens on ``port`` (``ports.listens_alone``:
        until this one exits on its failed bind, that one would answer)."""
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with _OPENER.open(f"{url}{self.ready_path}", timeout=2) as response:
                    if response.status == 200:
                        alone = listens_alone(port, process_tree(self.process.pid))
                        if alone is not None:
                            return True if alone else None
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            atexit.unregister(self._terminate)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(STOP_TIMEOUT)
            self.returncode = process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None

    def _remove_workdir(self) -> None:
        if self._own_workdir and self.workdir is not None:
            self._final_log = self.log_text()
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
