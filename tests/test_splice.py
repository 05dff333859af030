"""Uploads whose body goes from the socket to the disk with ``splice(2)`` (gateway/zerocopy.py).

A ``PUT`` with a ``Content-Length`` of 1 MiB or more and no checksum header, to the local
backend, is taken away from aiohttp: the backend moves the rest of the body from the socket to
its temporary file in the kernel. These tests drive a real gateway process over raw sockets, so
that each byte on the wire is chosen: the object must be exactly the body, the answer must
reach the client whole (also when the upload fails while the client is still sending), the
connection must close after the answer (aiohttp never parsed the body), and a failure must
leave the old version and no temporary file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from backends.local import TMP_DIR
from gateway.zerocopy import SPLICE_MIN
from tests.support.gateway_process import GatewayProcess

MiB: Final = 1 << 20
KEY_PATH: Final = "/api/v1/files/ns/big.bin"
READ_TIMEOUT: Final = 1.0


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    config = {
        "storage.type": "local",
        "storage.local.base-path": str(tmp_path / "data"),
        "server.read-timeout": READ_TIMEOUT,
        "auth.enabled": False,
    }
    with GatewayProcess(config) as process:
        yield process


def access_lines(gateway: GatewayProcess, field: str, value: object) -> list[dict[str, Any]]:
    """The gateway's access lines (JSON, one per request) whose ``field`` is ``value``."""
    lines = [json.loads(x) for x in gateway.log_text().splitlines() if x.startswith("{")]
    return [line for line in lines if line.get(field) == value]


def base(gateway: GatewayProcess) -> Path:
    return Path(gateway.config["storage"]["local"]["base-path"])


def temp_files(gateway: GatewayProcess, settle: float = 3.0) -> list[str]:
    """The temporary files under the gateway's folder, once its own background writes are done.

    The gateway writes documents of its own at any moment (usage counters once a second, audit
    batches), each through a temporary file that exists for a moment: poll until there is none
    or ``settle`` seconds passed. A temporary file an upload left behind stays.
    """
    root = base(gateway) / TMP_DIR
    deadline = time.monotonic() + settle
    while True:
        found = [p.name for p in root.rglob("*.tmp")]
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def connect(gateway: GatewayProcess) -> socket.socket:
    assert gateway.port is not None
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=20)
    return sock


def request_head(path: str, length: int | None, **headers: str) -> bytes:
    lines = [f"PUT {path} HTTP/1.1", "Host: gateway"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def read_answer(sock: socket.socket, buffered: bytes = b"") -> tuple[Answer, bytes]:
    """Read one response (``Content-Length`` framed); return it and the bytes after it."""
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the headers: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the end of the body")
        rest += chunk
    return Answer(int(status_line.split()[1]), headers, rest[:length]), rest[length:]


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def body_of(size: int, seed: int = 1) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    return (block * (size // len(block) + 1))[:size]


def get(gateway: GatewayProcess, path: str = KEY_PATH) -> Answer:
    with connect(gateway) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())
        answer, _ = read_answer(sock)
    return answer


def put_whole(gateway: GatewayProcess, data: bytes, path: str = KEY_PATH, **headers: str) -> Answer:
    with connect(gateway) as sock:
        sock.sendall(request_head(path, len(data), **headers) + data)
        answer, _ = read_answer(sock)
    return answer


# -- the object is the body --------------------------------------------------------------------


def test_large_upload_is_stored_whole_and_its_connection_closes(gateway: GatewayProcess) -> None:
    data = body_of(5 * MiB + 123)
    with connect(gateway) as sock:
        head = request_head(KEY_PATH, len(data), Content_Type="text/csv", X_Meta_Execution="e1")
        sock.sendall(head + data[:1000])  # most of the body arrives after the handler started
        time.sleep(0.2)
        sock.sendall(data[1000:])
        answer, _ = read_answer(sock)
        assert answer.status == 201, answer.body
        assert answer.json()["size"] == len(data)
        assert answer.headers.get("connection", "").lower() == "close"
        assert closed_by_server(sock)
    assert (base(gateway) / "ns/big.bin").read_bytes() == data
    stored = get(gateway)
    assert stored.body == data
    assert stored.headers["content-type"] == "text/csv"
    assert stored.headers["x-meta-execution"] == "e1"
    assert stored.headers["etag"] == answer.headers["etag"]
    assert temp_files(gateway) == []
    deadline = time.monotonic() + 5  # access lines are written in batches, at most 0.2 s late
    while not access_lines(gateway, "method", "PUT") and time.monotonic() < deadline:
        time.sleep(0.05)
    put_line = access_lines(gateway, "method", "PUT")[0]
    assert put_line["bytes_in"] == len(data)


def test_small_upload_keeps_the_connection_open(gateway: GatewayProcess) -> None:
    data = body_of(SPLICE_MIN - 1)
    with connect(gateway) as sock:
        sock.sendall(request_head(KEY_PATH, len(data)) + data)
        answer, rest = read_answer(sock)
        assert answer.status == 201
        assert answer.headers.get("connection", "").lower() != "close"
        sock.sendall(f"GET {KEY_PATH} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())
        again, _ = read_answer(sock, rest)
    assert again.status == 200 and again.body == data


def test_a_request_pipelined_after_a_large_body_is_not_stored_as_body(
    gateway: GatewayProcess,
) -> None:
    data = body_of(2 * MiB)
    with connect(gateway) as sock:
        pipelined = b"DELETE " + KEY_PATH.encode() + b" HTTP/1.1\r\nHost: gateway\r\n\r\n"
        sock.sendall(request_head(KEY_PATH, len(data)) + data + pipelined)
        answer, _ = read_answer(sock)
        assert answer.status == 201
        assert closed_by_server(sock)  # the DELETE was not served on this connection
    assert (base(gateway) / "ns/big.bin").read_bytes() == data


def test_expect_100_continue(gateway: GatewayProcess) -> None:
    data = body_of(3 * MiB)
    with connect(gateway) as sock:
        sock.sendall(request_head(KEY_PATH, len(data), Expect="100-continue"))
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100")
        sock.sendall(data)
        answer, _ = read_answer(sock, interim.partition(b"\r\n\r\n")[2])
    assert answer.status == 201
    assert (base(gateway) / "ns/big.bin").read_bytes() == data


def test_chunked_and_checksummed_bodies_still_stream_through_python(
    gateway: GatewayProcess,
) -> None:
    data = body_of(3 * MiB, seed=2)
    chunked = b"".join(
        f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        for piece in (data[i : i + MiB] for i in range(0, len(data), MiB))
    )
    with connect(gateway) as sock:
        head = request_head(KEY_PATH, None, Transfer_Encoding="chunked")
        sock.sendall(head + chunked + b"0\r\n\r\n")
        answer, _ = read_answer(sock)
        assert answer.status == 201
        assert answer.headers.get("connection", "").lower() != "close"
    assert (base(gateway) / "ns/big.bin").read_bytes() == data

    wrong = hashlib.sha256(b"not the body").hexdigest()
    refused = put_whole(gateway, body_of(3 * MiB, seed=3), X_Checksum_Sha256=wrong)
    assert refused.status == 400 and "X-Checksum-Sha256" in refused.json()["message"]
    assert (base(gateway) / "ns/big.bin").read_bytes() == data

    other = body_of(3 * MiB, seed=4)
    right = hashlib.sha256(other).hexdigest()
    assert put_whole(gateway, other, X_Checksum_Sha256=right).status == 201
    assert (base(gateway) / "ns/big.bin").read_bytes() == other


# -- failures: the old version stays, nothing partial, the answer arrives --------------------


def test_client_gone_mid_body_stores_nothing(gateway: GatewayProcess) -> None:
    old = body_of(SPLICE_MIN, seed=5)
    assert put_whole(gateway, old).status == 201
    with connect(gateway) as sock:
        sock.sendall(request_head(KEY_PATH, 8 * MiB) + body_of(3 * MiB))
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while not access_lines(gateway, "status", 400) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert access_lines(gateway, "status", 400)
    assert get(gateway).body == old
    assert temp_files(gateway) == []
    assert gateway.alive()


def test_client_stalled_mid_body_gets_408_and_nothing_is_stored(gateway: GatewayProcess) -> None:
    old = body_of(SPLICE_MIN, seed=6)
    assert put_whole(gateway, old).status == 201
    with connect(gateway) as sock:
        sock.sendall(request_head(KEY_PATH, 8 * MiB) + body_of(2 * MiB))
        started = time.monotonic()
        answer, _ = read_answer(sock)  # sent nothing more: the read timeout ends the upload
        waited = time.monotonic() - started
        assert answer.status == 408, answer.body
        assert "nothing was stored" in answer.json()["message"]
        assert READ_TIMEOUT * 0.9 <= waited < READ_TIMEOUT + 5
    assert get(gateway).body == old
    assert temp_files(gateway) == []


def test_refused_upload_answer_arrives_while_the_client_is_still_sending(
    gateway: GatewayProcess,
) -> None:
    old = body_of(SPLICE_MIN, seed=7)
    assert put_whole(gateway, old).status == 201
    data = body_of(16 * MiB, seed=8)
    with connect(gateway) as sock:
        # Create-only on an existing key: refused before any body byte is stored, while the
        # client is still pushing its 16 MiB. Closing then would reset the connection and
        # could destroy the answer: the gateway reads and drops the rest first.
        sock.sendall(request_head(KEY_PATH, len(data), If_None_Match="*"))
        sock.sendall(data)
        answer, _ = read_answer(sock)
        assert answer.status == 412, answer.body
        assert answer.headers.get("connection", "").lower() == "close"
        assert closed_by_server(sock)
    assert get(gateway).body == old
    assert temp_files(gateway) == []


def test_descriptors_come_back_after_spliced_uploads(gateway: GatewayProcess) -> None:
    psutil = pytest.importorskip("psutil")
    assert gateway.process is not None
    process = psutil.Process(gateway.process.pid)
    assert put_whole(gateway, body_of(2 * MiB)).status == 201  # warm up the thread pool
    before = process.num_fds()
    for seed in range(5):
        assert put_whole(gateway, body_of(2 * MiB, seed=seed)).status == 201
    with connect(gateway) as sock:  # and one that fails
        sock.sendall(request_head(KEY_PATH, 4 * MiB) + body_of(MiB))
    deadline = time.monotonic() + 10
    while process.num_fds() > before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.num_fds() <= before + 1
    assert os.path.getsize(base(gateway) / "ns/big.bin") == 2 * MiB
