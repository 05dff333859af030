"""``gateway.client``: the async client and its sync wrapper against a real gateway process
(auth on, a tenant, a worker's token); retries against a stand-in server that fails on
purpose; and the 1 GiB round trip in constant memory (peak RSS of the client process)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.client import (
    AsyncClient,
    ChecksumMismatch,
    Client,
    Conflict,
    Forbidden,
    InvalidKey,
    NotFound,
    PreconditionFailed,
    RangeNotSatisfiable,
    TransportError,
    Unauthorized,
    Unavailable,
)
from tests.support.tenant_gateway import TenantGateway, tenant_gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantGateway]:
    base = tmp_path_factory.mktemp("client") / "data"
    with tenant_gateway({"storage": {"type": "local", "local": {"base-path": str(base)}}}) as gw:
        yield gw


@pytest.fixture
def client(gateway: TenantGateway) -> Iterator[Client]:
    with Client(**gateway.options) as sync_client:
        yield sync_client
        for entry in list(sync_client.list("")):
            sync_client.delete(entry.key, recursive=True)


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part


def test_upload_every_source_and_read_back(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "in.bin"
    path.write_bytes(b"from a path" * 1000)
    seekable = io.BytesIO(b"skip:from a file object")
    seekable.seek(5)
    sources: dict[str, Any] = {
        "ns/bytes": b"from bytes",
        "ns/path": path,
        "ns/file": seekable,
        "ns/iter": _chunks(b"from ", b"an async ", b"iterator"),
    }
    expected = {
        "ns/bytes": b"from bytes",
        "ns/path": b"from a path" * 1000,
        "ns/file": b"from a file object",
        "ns/iter": b"from an async iterator",
    }
    for key, source in sources.items():
        answer = client.upload(key, source)
        assert (answer.key, answer.uri, answer.size) == (
            key,
            f"kestra:///{key}",
            len(expected[key]),
        )
    for key, data in expected.items():
        assert client.read(key) == data
        assert client.read(f"kestra://{key}") == data  # the canonical URI form
        assert client.read(f"kestra:///{key}") == data  # the legacy form
    assert sorted(info.key for info in client.list("ns")) == sorted(expected)


def test_content_type_metadata_checksum_and_ranges(client: Client, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    digest = hashlib.sha256(data).hexdigest()
    client.upload(
        "ns/f.bin", data, content_type="text/csv", metadata={"execution": "e1"}, checksum=digest
    )
    info = client.stat("ns/f.bin")
    assert info.metadata is not None
    assert (info.size, info.content_type, dict(info.metadata), info.is_dir) == (
        len(data), "text/csv", {"execution": "e1"}, False,
    )  # fmt: skip
    assert client.read("ns/f.bin", start=10, end=20) == data[10:20]
    assert client.read("ns/f.bin", start=10_000) == data[10_000:]
    assert client.read("ns/f.bin", start=-7) == data[-7:]
    with client.stream("ns/f.bin", start=100, end=5000) as download:
        assert download.headers.status == 206
        assert (download.headers.size, download.headers.length) == (len(data), 4900)
        assert b"".join(download) == data[100:5000]
    target = tmp_path / "out.bin"
    seen: list[int] = []
    headers = client.download("ns/f.bin", target, progress=seen.append)
    assert target.read_bytes() == data and sum(seen) == len(data)
    assert headers.metadata == {"execution": "e1"}
    head = client.head("kestra://ns/f.bin")
    assert (head.status, head.size, head.content_type, head.etag) == (
        200, len(data), "text/csv", info.etag,
    )  # fmt: skip
    with pytest.raises(RangeNotSatisfiable):
        client.read("ns/f.bin", start=len(data) + 10)
    # checksum=True computes it; a wrong one stores nothing.
    client.upload("ns/g.bin", io.BytesIO(data), checksum=True)
    with pytest.raises(ChecksumMismatch):
        client.upload("ns/h.bin", data, checksum="00" * 32)
    assert not client.exists("ns/h.bin")
    with pytest.raises(ValueError, match="read twice"):
        client.upload("ns/h.bin", _chunks(b"x"), checksum=True)


def test_errors_are_typed_and_keep_the_rule(client: Client, gateway: TenantGateway) -> None:
    client.upload("ns/a", b"a")
    with pytest.raises(NotFound):
        client.stat("ns/missing")
    with pytest.raises(InvalidKey) as refused:
        client.upload("ns/../../etc/passwd", b"x")
    assert (refused.value.http_status, refused.value.rule) == (400, "dot-segment")
    with pytest.raises(InvalidKey) as refused:
        client.read("kestra://user@ns/a")  # refused before any request, by the same rules
    assert refused.value.rule == "uri"
    with pytest.raises(PreconditionFailed):
        client.upload("ns/a", b"again", create_only=True)
    assert client.read("ns/a") == b"a"
    client.upload("ns/b", b"b")
    with pytest.raises(Conflict):
        client.move("ns/a", "ns/b")
    assert client.move("ns/a", "kestra:///ns/moved/a") == "ns/moved/a"
    client.mkdir("ns/empty/dir")
    assert client.stat("ns/empty/dir").is_dir
    assert client.delete("ns/moved/a") == 1
    with pytest.raises(NotFound):
        client.delete("ns/moved/a")
    with (
        Client(gateway.url, tenant="other", token=gateway.token) as stranger,
        pytest.raises(Forbidden),
    ):
        stranger.stat("ns/b")
    with (
        Client(gateway.url, tenant=gateway.tenant, token="not-a-token") as stranger,
        pytest.raises(Unauthorized),
    ):
        stranger.stat("ns/b")
    # Basic credentials: the super admin's hold (403: no role on the tenant, as in Kestra),
    # a wrong password does not (401).
    username, password = gateway.admin_auth.split(":", 1)
    with (
        Client(gateway.url, tenant=gateway.tenant, username=username, password=password) as admin,
        pytest.raises(Forbidden),
    ):
        admin.stat("ns/b")
    with (
        Client(gateway.url, tenant=gateway.tenant, username=username, password="wrong") as admin,
        pytest.raises(Unauthorized),
    ):
        admin.stat("ns/b")


def test_a_body_that_ends_short_or_runs_long_stores_nothing(client: Client) -> None:
    with pytest.raises(TransportError, match="shrank"):
        client.upload("ns/short", _chunks(b"12345"), size=10)
    with pytest.raises(TransportError, match="grew"):
        client.upload("ns/long", _chunks(b"12345", b"67890"), size=7)
    assert not client.exists("ns/short") and not client.exists("ns/long")


def test_list_iterates_over_pages(client: Client) -> None:
    keys = [f"ns/many/{i:02d}" for i in range(7)]
    for key in keys:
        client.upload(key, key.encode())
    listed = list(client.list("ns/many", page_size=2))
    assert [info.key for info in listed] == keys
    # Listings carry no metadata or content type (S3 lists neither): None, not "empty".
    assert {(info.metadata, info.content_type) for info in listed} == {(None, None)}
    assert "metadata" not in listed[0].to_json()
    assert [info.key for info in client.list("ns", recursive=True, page_size=3)] == keys
    assert client.delete("ns/many", recursive=True) == 7


def test_settings_come_from_the_environment(
    gateway: TenantGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_URL", gateway.url)
    monkeypatch.setenv("GATEWAY_TENANT", gateway.tenant)
    monkeypatch.setenv("GATEWAY_TOKEN", gateway.token)

    async def run() -> bytes:
        async with AsyncClient() as client:
            await client.upload("env/x", b"env")
            data = await client.read("env/x")
            await client.delete("env", recursive=True)
            return data

    assert asyncio.run(run()) == b"env"
    monkeypatch.delenv("GATEWAY_URL")
    with pytest.raises(ValueError, match="GATEWAY_URL"):
        AsyncClient()


# -- retries ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _served(app: web.Application, **options: Any) -> AsyncIterator[AsyncClient]:
    """Serve ``app`` on a free port; yield a client of it."""
    async with TestServer(app) as server, AsyncClient(str(server.make_url("")), **options) as c:
        yield c


class Flaky:
    """A stand-in gateway: answers 503 to the first ``failures`` requests of each route, and
    records every body it received."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}
        self.bodies: list[bytes] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/api/v1/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = f"{request.method} {request.match_info['tail'].split('/')[0]}"
        self.calls[route] = self.calls.get(route, 0) + 1
        body = await request.read()
        self.bodies.append(body)
        if self.calls[route] <= self.failures:
            return web.json_response(
                {"error": "storage_unavailable", "message": "try again"}, status=503
            )
        if request.method == "PUT":
            return web.json_response(
                {"key": "k", "uri": "kestra:///k", "size": len(body), "etag": None}, status=201
            )
        if request.method == "POST":
            return web.json_response({"key": "k", "uri": "kestra:///k"})
        return web.Response(body=b"payload")


async def test_idempotent_operations_are_retried_after_503() -> None:
    flaky = Flaky(failures=2)
    async with _served(flaky.app(), backoff=0.001, retries=3) as client:
        seen: list[int] = []
        assert (await client.upload("k", b"replayable", progress=seen.append)).size == 10
        assert sum(seen) == 10  # each retry rewinds the progress it had reported
        assert await client.read("k") == b"payload"
        assert flaky.calls == {"PUT files": 3, "GET files": 3}
        # Each attempt sent the whole body again.
        assert flaky.bodies == [b"replayable"] * 3 + [b""] * 3
        flaky.calls.clear()
        flaky.bodies.clear()
        with open(__file__, "rb") as file:
            file.seek(100)  # sent again from where it was, each time
            assert (await client.upload("k", file)).size == Path(__file__).stat().st_size - 100
        assert flaky.calls == {"PUT files": 3}
        assert set(flaky.bodies) == {Path(__file__).read_bytes()[100:]}
    # Past its retries, the 503 is raised.
    async with _served(Flaky(failures=5).app(), backoff=0.001, retries=1) as client:
        with pytest.raises(Unavailable):
            await client.stat("k")


async def test_one_shot_bodies_and_moves_are_not_retried() -> None:
    flaky = Flaky(failures=1)
    async with _served(flaky.app(), backoff=0.001, retries=3) as client:
        with pytest.raises(Unavailable):
            await client.upload("k", _chunks(b"once"))
        with pytest.raises(Unavailable):
            await client.move("a", "b")
    assert flaky.calls == {"PUT files": 1, "POST move": 1}


async def test_connection_failures_are_retried_then_raised() -> None:
    attempts = 0

    async def cut(request: web.Request) -> web.StreamResponse:
        nonlocal attempts
        attempts += 1
        assert request.transport is not None
        request.transport.abort()  # no answer at all
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", cut)
    async with _served(app, backoff=0.001, retries=2) as client:
        with pytest.raises(TransportError):
            await client.stat("k")
    # Each of the 3 attempts is sent twice: aiohttp itself resends an idempotent request once
    # when the server drops the connection.
    assert attempts == 6


async def test_a_download_cut_mid_body_starts_over(tmp_path: Path) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    attempts = 0

    async def half_then_whole(request: web.Request) -> web.StreamResponse:
        nonlocal attempts
        attempts += 1
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(body)
        await response.prepare(request)
        if attempts == 1:
            await response.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.abort()  # what the gateway does when its store fails mid-way
            return response
        await response.write(body)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/api/v1/files/{tail:.*}", half_then_whole)
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    async with _served(app, backoff=0.001, retries=0) as client:
        with pytest.raises(TransportError):
            await client.download("k", target)
    assert target.read_bytes() == b"previous"  # a failed download leaves the file as it was
    attempts = 0
    seen: list[int] = []
    async with _served(app, backoff=0.001, retries=2) as client:
        headers = await client.download("k", target, progress=seen.append)
    assert (attempts, headers.length, sum(seen)) == (2, len(body), len(body))
    assert target.read_bytes() == body
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no partial file left


# -- memory -------------------------------------------------------------------------------

RSS_SCRIPT = """
import json, os, subprocess, sys, time
from gateway.client import Client


def high_water(status):
    # VmHWM: the peak RSS of this address space only. (getrusage's ru_maxrss is not: Linux
    # carries the forking parent's peak over exec, so a child of a big pytest worker would
    # report the worker's peak.)
    return next(int(line.split()[1]) * 1024 for line in status.splitlines()
                if line.startswith("VmHWM:"))


url, tenant, token, source, target = sys.argv[1:6]
with Client(url, tenant=tenant, token=token) as client:
    started = time.monotonic()
    client.upload("big/1gib.bin", source)
    uploaded = time.monotonic()
    client.download("big/1gib.bin", target)
    done = time.monotonic()
    client.delete("big", recursive=True)
peak = high_water(open("/proc/self/status").read())
# `gateway files put`, in a child process that reports its own high-water mark on exit.
CLI = (
    "import atexit, runpy, sys\\n"
    "atexit.register(lambda: sys.stderr.write('HWM ' + open('/proc/self/status').read()))\\n"
    "sys.argv = ['gateway', *sys.argv[1:]]\\n"
    "runpy.run_module('gateway', run_name='__main__')\\n"
)
env = {**os.environ, "GATEWAY_URL": url, "GATEWAY_TENANT": tenant, "GATEWAY_TOKEN": token}
put = subprocess.run([sys.executable, "-c", CLI, "files", "put", source, "big/cli.bin"],
                     env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                     text=True)
cli_peak = high_water(put.stderr.split("HWM ", 1)[1])
subprocess.run([sys.executable, "-m", "gateway", "files", "rm", "big", "--recursive"], env=env,
               check=True, stdout=subprocess.DEVNULL)
print(json.dumps({"peak": peak, "cli_peak": cli_peak, "up": uploaded - started,
                  "down": done - uploaded}))
"""
GIB = 1 << 30


@pytest.mark.slow
def test_one_gib_round_trip_keeps_client_and_cli_rss_under_150_mib(
    gateway: TenantGateway, tmp_path: Path
) -> None:
    source, target = tmp_path / "source.bin", tmp_path / "target.bin"
    with open(source, "wb") as file:
        head = bytes(range(256)) * 4096  # 1 MiB of data, then a hole (zeros)
        file.write(head)
        file.truncate(GIB)
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, gateway.url, gateway.tenant, gateway.token,
         str(source), str(target)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    peak, cli_peak = result["peak"] / 2**20, result["cli_peak"] / 2**20
    print(f"\n1 GiB: up {result['up']:.1f} s, down {result['down']:.1f} s, client peak RSS "
          f"{peak:.0f} MiB, CLI {cli_peak:.0f} MiB")  # fmt: skip
    assert target.stat().st_size == GIB
    with open(target, "rb") as file:
        assert file.read(len(head)) == head
        file.seek(GIB - 4096)
        assert file.read() == bytes(4096)
    assert result["peak"] < 150 * 2**20
    assert result["cli_peak"] < 150 * 2**20
