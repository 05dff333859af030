"""The test launchers never take another process's server for their own.

``free_port()`` probes a port that another process may bind before the server under test does;
until that server exits on its failed bind, a readiness probe is answered by the stranger (a CI
run once saw a fresh gateway answer 409 to its first user). Here a stranger answers 200 on
every path of the port the launcher is handed first: the launcher must start its server on
another port, and that server must be its own.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from tests.support import gateway_process, moto, ports

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Stranger(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"status": "ok", "stranger": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stranger() -> Iterator[int]:
    """A server of this process answering 200 to every GET; yields its port."""
    server = http.server.ThreadingHTTPServer((ports.HOST, 0), _Stranger)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class _HandingOutFirst:
    """A ``free_port`` that returns ``port`` first, then free ports; counts its calls."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.port if self.calls == 1 else ports.free_port()


def test_listens_alone_tells_own_foreign_and_free_ports(stranger: int) -> None:
    assert ports.listens_alone(stranger, {os.getpid()}) is True
    assert ports.listens_alone(stranger, {os.getpid() + 1_000_000}) is False
    assert ports.listens_alone(ports.free_port(), {os.getpid()}) is None
    assert ports.listeners(stranger) == {os.getpid()}


def test_a_refused_port_refuses_and_cannot_be_listened_on() -> None:
    with ports.refused_port() as port:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((ports.HOST, port), timeout=5)
        with socket.socket() as other, pytest.raises(OSError):
            other.bind((ports.HOST, port))
            other.listen()
        assert ports.listens_alone(port, {os.getpid()}) is None


def test_a_gateway_launcher_handed_a_taken_port_starts_on_another(
    stranger: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed = _HandingOutFirst(stranger)
    monkeypatch.setattr(gateway_process, "free_port", handed)
    with gateway_process.GatewayProcess({"storage": {"type": "memory"}}) as process:
        assert handed.calls == 2  # the stranger's port, then another
        assert process.port is not None and process.port != stranger
        assert process.process is not None
        assert ports.listens_alone(process.port, ports.process_tree(process.process.pid))
        with _OPENER.open(f"{process.url}/health/ready", timeout=10) as response:
            assert "stranger" not in json.loads(response.read())


def test_a_moto_launcher_handed_a_taken_port_starts_on_another(
    stranger: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed = _HandingOutFirst(stranger)
    monkeypatch.setattr(moto, "free_port", handed)
    with moto.MotoServer() as server:
        assert handed.calls == 2  # the stranger's port, then another
        assert server.endpoint is not None
        assert not server.endpoint.endswith(f":{stranger}")
        with _OPENER.open(f"{server.endpoint}/moto-api/data.json", timeout=10) as response:
            assert "stranger" not in json.loads(response.read())
