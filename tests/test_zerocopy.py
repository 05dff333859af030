"""Downloads from the local backend with ``sendfile(2)`` (``gateway/zerocopy.py``), end to end.

The gateway runs as a real process; clients are raw sockets with a small receive buffer, so
the server's socket fills and the event loop has to wait for it to become writable again (the
EAGAIN path), or gives up after ``server.read-timeout`` when the client reads nothing.

- A slow reader gets every byte, in order.
- A client that stops reading is cut after ``server.read-timeout``; the gateway logs it, keeps
  serving, and holds no duplicated descriptor afterwards.
- Ranges (sendfile with an offset) and 20 concurrent downloads are byte-exact.
- A client that disconnects mid-download disturbs no other download and leaks nothing.
- An object replaced during a download: that download still gets the whole old version.
"""

from __future__ import annotations

import hashlib
import random
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import psutil
import pytest

from tests.support.gateway_process import GatewayProcess
from tests.support.ports import HOST

pytestmark = pytest.mark.slow

MiB: Final = 1 << 20
TENANT: Final = "t1"
SMALL_RCVBUF: Final = 16 * 1024
READ_TIMEOUT: Final = 1.0  # server.read-timeout of the gateway that cuts stalled readers
FD_SLACK: Final = 2
FD_SETTLE_SECONDS: Final = 10.0
SOCKET_TIMEOUT: Final = 30.0

_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _config(base: Path, **extra: Any) -> dict[str, Any]:
    return {
        "storage.type": "local",
        "storage.local.base-path": str(base),
        "auth.enabled": False,
        "tenants": {"enabled": True, "ids": [TENANT]},
        **extra,
    }


def _path(key: str) -> str:
    return f"/api/v1/{TENANT}/files/{key}"


def _random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _put(gateway: GatewayProcess, key: str, body: bytes) -> None:
    assert gateway.url is not None
    request = urllib.request.Request(gateway.url + _path(key), data=body, method="PUT")
    with _OPENER.open(request, timeout=SOCKET_TIMEOUT) as response:
        assert response.status == 201


class Download:
    """A GET on its own raw connection: the status line and headers read, the body not yet."""

    def __init__(
        self,
        port: int,
        path: str,
        *,
        rcvbuf: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(SOCKET_TIMEOUT)
        self.sock.connect((HOST, port))
        lines = [f"GET {path} HTTP/1.1", "Host: gateway", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            assert chunk, f"the connection closed before the headers: {data!r}"
            data += chunk
        head, self.pending = data.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {
            name.strip().lower(): value.strip()
            for name, value in (line.split(":", 1) for line in header_lines)
        }
        self.received = 0

    @property
    def length(self) -> int:
        return int(self.headers["content-length"])

    def read(self, count: int, piece: int = 64 * 1024) -> bytes:
        """Read ``count`` bytes of the body (fewer only if the connection ends)."""
        parts = []
        if self.pending:
            parts.append(self.pending[:count])
            self.pending = self.pending[count:]
        got = sum(map(len, parts))
        while got < count:
            chunk = self.sock.recv(min(piece, count - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        self.received += got
        return b"".join(parts)

    def read_to_end(self) -> tuple[bytes, BaseException | None]:
        """Read until the server closes the connection; return the bytes and the error that
        ended the read, if any (a reset)."""
        parts = [self.pending]
        self.pending = b""
        error: BaseException | None = None
        try:
            while chunk := self.sock.recv(256 * 1024):
                parts.append(chunk)
        except OSError as exc:  # ECONNRESET after an abort
            error = exc
        body = b"".join(parts)
        self.received += len(body)
        return body, error

    def close(self) -> None:
        self.sock.close()


def _get(
    port: int, key: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    download = Download(port, _path(key), headers=headers)
    try:
        body, error = download.read_to_end()
        assert error is None, error
        return download.status, download.headers, body
    finally:
        download.close()


def _num_fds(gateway: GatewayProcess) -> int:
    assert gateway.process is not None
    return int(psutil.Process(gateway.process.pid).num_fds())


def _settled_fds(gateway: GatewayProcess, baseline: int) -> int:
    """Wait (a while) for the gateway's descriptor count to come back near ``baseline``."""
    deadline = time.monotonic() + FD_SETTLE_SECONDS
    count = _num_fds(gateway)
    while count > baseline + FD_SLACK and time.monotonic() < deadline:
        time.sleep(0.1)
        count = _num_fds(gateway)
    return count


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    with GatewayProcess(_config(tmp_path / "data")) as process:
        yield process


def _port(gateway: GatewayProcess) -> int:
    assert gateway.port is not None
    return gateway.port


def test_a_slow_reader_gets_every_byte(gateway: GatewayProcess) -> None:
    body = _random(8 * MiB, seed=1)
    _put(gateway, "ns/slow.bin", body)
    download = Download(_port(gateway), _path("ns/slow.bin"), rcvbuf=SMALL_RCVBUF)
    try:
        assert download.status == 200
        assert download.length == len(body)
        time.sleep(1.0)  # the server's socket fills up meanwhile: sendfile stops on EAGAIN
        parts = []
        until = time.monotonic() + 1.0
        while time.monotonic() < until:  # then a trickle: many short waits for writability
            part = download.read(4096, piece=4096)
            assert part, "the connection ended early"
            parts.append(part)
            time.sleep(0.005)
        rest, error = download.read_to_end()
    finally:
        download.close()
    assert error is None, error
    received = b"".join(parts) + rest
    assert len(received) == len(body)
    assert _sha(received) == _sha(body)
    assert gateway.alive()
    assert "broke after its headers" not in gateway.log_text()


def test_a_client_that_stops_reading_is_cut_after_the_read_timeout(tmp_path: Path) -> None:
    config = _config(tmp_path / "data", **{"server.read-timeout": READ_TIMEOUT})
    with GatewayProcess(config) as gateway:
        port = _port(gateway)
        # Larger than the server's send buffer (tcp_wmem max, 4 MiB here) plus the client's.
        body = _random(16 * MiB, seed=2)
        small = _random(64 * 1024, seed=3)
        _put(gateway, "ns/big.bin", body)
        _put(gateway, "ns/small.bin", small)
        status, _, got = _get(port, "ns/small.bin")  # warm up the sendfile path
        assert status == 200 and got == small
        baseline = _num_fds(gateway)

        download = Download(port, _path("ns/big.bin"), rcvbuf=SMALL_RCVBUF)
        try:
            assert download.status == 200
            assert download.length == len(body)
            first = download.read(64 * 1024)
            assert first == body[: len(first)]
            time.sleep(4 * READ_TIMEOUT)  # reads nothing: the server must give up
            rest, _ = download.read_to_end()
        finally:
            download.close()
        total = len(first) + len(rest)
        assert total < len(body), "the stalled download was not cut"
        assert first + rest == body[:total]  # what did arrive is the right prefix

        assert gateway.alive(), gateway.log_text()[-3000:]
        status, headers, got = _get(port, "ns/big.bin")
        assert status == 200
        assert int(headers["content-length"]) == len(body)
        assert _sha(got) == _sha(body)

        log = gateway.log_text()
        assert "download of /api/v1/t1/files/ns/big.bin broke after its headers" in log, log[-3000:]
        assert f"read nothing for {READ_TIMEOUT:g} s" in log, log[-3000:]
        after = _settled_fds(gateway, baseline)
        assert after <= baseline + FD_SLACK, (baseline, after)


def test_ranges_and_concurrent_downloads_are_byte_exact(gateway: GatewayProcess) -> None:
    port = _port(gateway)
    body = _random(3 * MiB, seed=4)
    _put(gateway, "ns/ranged.bin", body)
    size = len(body)
    cases = {
        "bytes=0-0": (0, 1),
        f"bytes={MiB - 1000}-{2 * MiB + 300}": (MiB - 1000, 2 * MiB + 301),
        "bytes=-100": (size - 100, size),
        f"bytes={size - 5000}-": (size - 5000, size),
        f"bytes={MiB}-{MiB}": (MiB, MiB + 1),
    }
    for spec, (start, end) in cases.items():
        status, headers, got = _get(port, "ns/ranged.bin", {"Range": spec})
        assert status == 206, spec
        assert headers["content-range"] == f"bytes {start}-{end - 1}/{size}", spec
        assert int(headers["content-length"]) == end - start, spec
        assert got == body[start:end], spec

    digest = _sha(body)

    def full() -> tuple[int, int, str]:
        status, headers, got = _get(port, "ns/ranged.bin")
        return status, int(headers["content-length"]), _sha(got)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: full(), range(20)))
    assert results == [(200, size, digest)] * 20


def test_a_client_leaving_mid_download_disturbs_no_one(gateway: GatewayProcess) -> None:
    port = _port(gateway)
    body = _random(32 * MiB, seed=5)
    _put(gateway, "ns/huge.bin", body)
    status, _, got = _get(port, "ns/huge.bin", {"Range": "bytes=0-99"})  # warm up
    assert status == 206 and got == body[:100]
    baseline = _num_fds(gateway)

    leaving = Download(port, _path("ns/huge.bin"), rcvbuf=SMALL_RCVBUF)
    staying = Download(port, _path("ns/huge.bin"))
    try:
        assert leaving.status == 200 and staying.status == 200
        assert leaving.read(MiB) == body[:MiB]
        head = staying.read(MiB)
        leaving.close()  # unread data in its buffer: the kernel answers with a reset
        time.sleep(0.2)
        rest, error = staying.read_to_end()
    finally:
        leaving.close()
        staying.close()
    assert error is None, error
    assert staying.length == len(body)
    assert _sha(head + rest) == _sha(body)

    assert gateway.alive(), gateway.log_text()[-3000:]
    status, _, got = _get(port, "ns/huge.bin", {"Range": "bytes=-1000"})
    assert status == 206 and got == body[-1000:]
    after = _settled_fds(gateway, baseline)
    assert after <= baseline + FD_SLACK, (baseline, after)
    assert "Traceback" not in gateway.log_text()


def test_a_download_keeps_the_version_it_opened(gateway: GatewayProcess) -> None:
    port = _port(gateway)
    old = _random(16 * MiB, seed=6)
    new = _random(5 * MiB + 7, seed=7)
    _put(gateway, "ns/replaced.bin", old)
    download = Download(port, _path("ns/replaced.bin"), rcvbuf=SMALL_RCVBUF)
    try:
        assert download.status == 200
        assert download.length == len(old)
        head = download.read(256 * 1024)
        _put(gateway, "ns/replaced.bin", new)  # replaced while the download is under way
        status, headers, got = _get(port, "ns/replaced.bin")
        assert status == 200
        assert int(headers["content-length"]) == len(new)
        assert _sha(got) == _sha(new)
        time.sleep(0.3)
        rest, error = download.read_to_end()
    finally:
        download.close()
    assert error is None, error
    assert len(head) + len(rest) == len(old)
    assert _sha(head + rest) == _sha(old)
