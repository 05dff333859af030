"""``gateway serve`` as a real process: start, answer, and SIGTERM with uploads in flight."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow


def _start_upload(port: int, path: str, total: int, first: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = f"PUT {path} HTTP/1.1\r\nHost: g\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n"
    sock.sendall(head.encode() + first)
    return sock


def _status(sock: socket.socket) -> int | None:
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        return None
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1") else None


def _tmp_files(base: Path) -> list[Path]:
    """What the gateway's processes left in the store's temporary folder (the checkpoint
    they record when they remove their journals aside)."""
    tmp = base / ".gateway" / "tmp"
    return [p for p in tmp.iterdir() if p.name != "checkpoint"] if tmp.exists() else []


def _config(base: Path, grace: float) -> dict[str, object]:
    return {
        "storage.type": "local",
        "storage.local.base-path": str(base),
        "server.shutdown-timeout": grace,
        "auth.enabled": False,
    }


def test_serve_answers_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    gateway = GatewayProcess(_config(tmp_path / "data", 5))
    url = gateway.start()
    request = urllib.request.Request(url + "/api/v1/files/ns/a.txt", data=b"hi", method="PUT")
    with urllib.request.urlopen(request) as response:
        assert response.status == 201
    assert (tmp_path / "data/ns/a.txt").read_bytes() == b"hi"
    assert gateway.stop() == 0


def test_sigterm_lets_an_upload_in_flight_finish(tmp_path: Path) -> None:
    base = tmp_path / "data"
    gateway = GatewayProcess(_config(base, 10))
    gateway.start()
    assert gateway.process is not None and gateway.port is not None
    body = b"x" * (4 << 20)
    sock = _start_upload(gateway.port, "/api/v1/files/ns/big.bin", len(body), body[: 1 << 20])
    time.sleep(0.3)
    gateway.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    sock.sendall(body[1 << 20 :])
    assert _status(sock) == 201
    sock.close()
    assert gateway.process.wait(20) == 0
    assert (base / "ns/big.bin").read_bytes() == body
    assert _tmp_files(base) == []
    gateway.stop()


def test_sigterm_aborts_a_stalled_upload_without_a_partial_object(tmp_path: Path) -> None:
    base = tmp_path / "data"
    (base / "ns").mkdir(parents=True)
    (base / "ns/big.bin").write_bytes(b"previous version")
    gateway = GatewayProcess(_config(base, 1))
    gateway.start()
    assert gateway.process is not None and gateway.port is not None
    sock = _start_upload(gateway.port, "/api/v1/files/ns/big.bin", 8 << 20, b"y" * (2 << 20))
    time.sleep(0.5)
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(20) == 0  # the grace period ran out, the upload was aborted
    assert _status(sock) != 201
    sock.close()
    assert (base / "ns/big.bin").read_bytes() == b"previous version"
    assert _tmp_files(base) == []
    gateway.stop()


def test_python_dash_m_gateway_prints_its_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--version"], capture_output=True, text=True, check=True
    )
    assert "gateway, version" in result.stdout


def test_s3_unreachable_at_start_keeps_trying_then_serves(tmp_path: Path) -> None:
    """No crash loop: /health/live answers, /health/ready says 503 until the store answers."""
    from tests.support.moto import MotoServer, make_bucket

    moto = MotoServer()
    endpoint = moto.start()
    try:
        config = {
            "storage.type": "s3",
            "storage.s3.bucket": "late-bucket",  # made only after the gateway started
            "storage.s3.endpoint": endpoint,
            "storage.s3.region": "us-east-1",
            "storage.s3.access-key": "testing",
            "storage.s3.secret-key": "testing",
            "storage.s3.force-path-style": True,
            "auth.enabled": False,
        }
        # Started before its bucket exists: it must come up (live), not ready, and not exit.
        gateway = GatewayProcess(config, ready_path="/health/live")
        process_url = gateway.start()
        assert _status_of(process_url + "/health/live") == 200
        assert _status_of(process_url + "/health/ready") == 503
        assert _status_of(process_url + "/api/v1/files/x") == 503
        make_bucket(endpoint, "late-bucket")
        deadline = time.monotonic() + 30
        while _status_of(process_url + "/health/ready") != 200:
            assert time.monotonic() < deadline, gateway.log_text()[-2000:]
            time.sleep(0.2)
        assert gateway.process is not None and gateway.process.poll() is None
        gateway.stop()
    finally:
        moto.stop()


def _status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
