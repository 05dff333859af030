"""Backend failures over HTTP: a full disk, a store that resets, a read that breaks mid-stream.

The client gets a 5xx (507 for a full disk), nothing partial is stored, the gateway keeps
serving other requests, and it recovers when the store comes back. Most tests use
``FaultyBackend``, a wrapper that fails on demand; the last one fills a real (tiny) tmpfs.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from backends.base import SYSTEM_PREFIX, Backend, Info, Page, Reader
from backends.local import LOCK_NAME, TMP_DIR
from backends.memory import MemoryBackend
from gateway import config
from gateway.app import create_app
from tests.support.tmpfs import mounted_tmpfs

Client = TestClient[web.Request, web.Application]
AiohttpClient = Callable[[web.Application], Awaitable[Client]]
Fault = Callable[[], BaseException]

KiB = 1024
MiB = 1024 * KiB


def disk_full() -> BaseException:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def reset() -> BaseException:
    return ConnectionResetError(errno.ECONNRESET, "connection reset by the store")


def io_error() -> BaseException:
    return OSError(errno.EIO, os.strerror(errno.EIO))


def refused() -> BaseException:
    return ConnectionError("the store is not answering")


class FaultyReader(Reader):
    """A reader whose bytes stop, with ``fault``, after ``after`` bytes."""

    def __init__(self, inner: Reader, fault: Fault | None, after: int) -> None:
        self.inner = inner
        self.info = inner.info
        self.fault = fault
        self.after = after

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in self.inner.chunks(start, end):
            if self.fault is not None:
                room = self.after - sent
                if room <= 0:
                    raise self.fault()
                if len(chunk) > room:
                    yield chunk[:room]
                    raise self.fault()
            sent += len(chunk)
            yield chunk

    async def close(self) -> None:
        await self.inner.close()


class FaultyBackend(Backend):
    """Delegates to ``inner``; while a fault is set, the matching operations fail.

    Faults never touch the gateway's own keys (``.gateway/...``: registry, audit log), only
    the data the tests upload and read, and the root (which the readiness check probes).
    """

    protocol = "faulty"

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.empty_directories = inner.empty_directories  # type: ignore[misc]
        self.write_fault: Fault | None = None
        self.write_after = 64 * KiB  # bytes the store accepts before failing
        self.open_fault: Fault | None = None
        self.read_fault: Fault | None = None
        self.read_after = 0  # bytes a reader yields before failing
        self.meta_fault: Fault | None = None  # info and list
        self.failed_writes = 0
        self.whole_store = False  # faults reach the gateway's own keys too (the store is down)

    def heal(self) -> None:
        self.write_fault = self.open_fault = self.read_fault = self.meta_fault = None

    def _applies(self, key: str) -> bool:
        if self.whole_store:
            return True
        return key != SYSTEM_PREFIX and not key.startswith(SYSTEM_PREFIX + "/")

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def info(self, key: str) -> Info:
        if self.meta_fault is not None and self._applies(key):
            raise self.meta_fault()
        return await self.inner.info(key)

    async def list(
        self,
        key: str,
        *,
        recursive: bool = False,
        limit: int = 1000,
        start_after: str | None = None,
    ) -> Page:
        if self.meta_fault is not None and self._applies(key):
            raise self.meta_fault()
        return await self.inner.list(key, recursive=recursive, limit=limit, start_after=start_after)

    async def open_read(self, key: str) -> Reader:
        if not self._applies(key):
            return await self.inner.open_read(key)
        if self.open_fault is not None:
            raise self.open_fault()
        reader = await self.inner.open_read(key)
        return FaultyReader(reader, self.read_fault, self.read_after)

    async def write(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        exclusive: bool = False,
    ) -> Info:
        fault = self.write_fault
        if fault is not None and self._applies(key):
            chunks = self._failing(chunks, fault)
        return await self.inner.write(
            key, chunks, content_type=content_type, metadata=metadata, exclusive=exclusive
        )

    async def _failing(self, chunks: AsyncIterable[bytes], fault: Fault) -> AsyncIterator[bytes]:
        """Pass ``write_after`` bytes on to the store, then fail as the store would."""
        taken = 0
        async for chunk in chunks:
            room = self.write_after - taken
            if len(chunk) >= room:
                if room:
                    yield chunk[:room]
                self.failed_writes += 1
                raise fault()
            taken += len(chunk)
            yield chunk
        self.failed_writes += 1
        raise fault()  # a body shorter than write_after: the store fails at its end

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def delete_prefix(self, key: str) -> int:
        return await self.inner.delete_prefix(key)

    async def move(self, src: str, dst: str) -> None:
        await self.inner.move(src, dst)

    async def mkdir(self, key: str) -> None:
        await self.inner.mkdir(key)


def settings(**overrides: Any) -> config.Config:
    values: dict[str, Any] = {
        "storage.type": "memory",
        "tenants.enabled": True,
        "tenants.default-tenant": True,
        "tenants.ids": ["acme"],
        "auth.enabled": False,
    }
    values.update(overrides)
    return config.check(values)


@pytest.fixture
def store() -> FaultyBackend:
    return FaultyBackend(MemoryBackend())


@pytest.fixture
async def client(store: FaultyBackend, aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(create_app(settings(), backend=store))


URL = "/api/v1/acme/files/"


async def put_ok(client: Client, key: str, data: bytes) -> None:
    response = await client.put(URL + key, data=io.BytesIO(data))
    assert response.status == 201, await response.text()


async def get_body(client: Client, key: str) -> bytes:
    response = await client.get(URL + key)
    assert response.status == 200, await response.text()
    return await response.read()


async def assert_error(response: aiohttp.ClientResponse, status: int, code: str) -> None:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    assert (await response.json())["error"] == code


async def tenant_keys(store: FaultyBackend) -> list[str]:
    try:
        page = await store.inner.list("tenants/acme", recursive=True)
    except FileNotFoundError:
        return []
    return [info.name for info in page.entries]


# -- uploads ---------------------------------------------------------------------------------


async def test_disk_full_mid_upload_answers_507_and_stores_nothing(
    client: Client, store: FaultyBackend
) -> None:
    store.write_fault = disk_full
    response = await client.put(URL + "new.bin", data=b"n" * (512 * KiB))
    await assert_error(response, 507, "insufficient_storage")
    assert store.failed_writes == 1
    assert (await client.get(URL + "new.bin")).status == 404
    assert await tenant_keys(store) == []

    store.heal()
    await put_ok(client, "new.bin", b"n" * (512 * KiB))
    assert await get_body(client, "new.bin") == b"n" * (512 * KiB)


async def test_disk_full_during_an_overwrite_keeps_the_old_version(
    client: Client, store: FaultyBackend
) -> None:
    await put_ok(client, "d/file.bin", b"old")
    etag = (await client.get(URL + "d/file.bin")).headers["ETag"]
    store.write_fault = disk_full
    response = await client.put(URL + "d/file.bin", data=b"n" * (256 * KiB))
    await assert_error(response, 507, "insufficient_storage")
    response = await client.get(URL + "d/file.bin")
    assert response.status == 200
    assert response.headers["ETag"] == etag
    assert await response.read() == b"old"

    store.heal()
    await put_ok(client, "d/file.bin", b"new")
    assert await get_body(client, "d/file.bin") == b"new"


async def test_disk_full_on_a_small_upload_answers_507(
    client: Client, store: FaultyBackend
) -> None:
    # The store fails at the end of the body, after taking all of it.
    store.write_fault = disk_full
    response = await client.put(URL + "small.txt", data=b"tiny")
    await assert_error(response, 507, "insufficient_storage")
    assert (await client.get(URL + "small.txt")).status == 404


@pytest.mark.parametrize("fault", [reset, refused], ids=["reset", "refused"])
async def test_store_failure_mid_upload_answers_503_and_others_are_served(
    client: Client, store: FaultyBackend, fault: Fault
) -> None:
    await put_ok(client, "healthy.txt", b"still here")
    store.write_fault = fault
    response = await client.put(URL + "broken.bin", data=b"b" * (512 * KiB))
    await assert_error(response, 503, "storage_unavailable")
    assert (await client.get(URL + "broken.bin")).status == 404
    assert await tenant_keys(store) == ["tenants/acme/healthy.txt"]

    # While writes still fail, everything else is served.
    assert await get_body(client, "healthy.txt") == b"still here"
    assert (await client.get("/health/live")).status == 200
    assert (await client.get("/health/ready")).status == 200
    listing = await (await client.get("/api/v1/acme/list")).json()
    assert [entry["key"] for entry in listing["entries"]] == ["healthy.txt"]
    stat = await client.get("/api/v1/acme/stats/healthy.txt")
    assert stat.status == 200
    # Every upload fails the same way, and none leaves anything behind.
    for _ in range(3):
        response = await client.put(URL + "broken.bin", data=b"b" * (128 * KiB))
        await assert_error(response, 503, "storage_unavailable")
    assert await tenant_keys(store) == ["tenants/acme/healthy.txt"]

    store.heal()
    await put_ok(client, "broken.bin", b"fixed")
    assert await get_body(client, "broken.bin") == b"fixed"
    assert await get_body(client, "healthy.txt") == b"still here"


async def test_store_reset_on_a_chunked_upload_answers_503(
    client: Client, store: FaultyBackend
) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield b"c" * (32 * KiB)

    store.write_fault = reset
    response = await client.put(URL + "chunked.bin", data=body())
    await assert_error(response, 503, "storage_unavailable")
    assert await tenant_keys(store) == []
    store.heal()
    response = await client.put(URL + "chunked.bin", data=body())
    assert response.status == 201
    assert await get_body(client, "chunked.bin") == b"c" * (512 * KiB)


# -- downloads -------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [reset, refused, io_error], ids=["reset", "refused", "eio"])
async def test_store_failure_when_opening_a_download_answers_5xx_json(
    client: Client, store: FaultyBackend, fault: Fault
) -> None:
    await put_ok(client, "f.bin", b"f" * KiB)
    store.open_fault = fault
    response = await client.get(URL + "f.bin")
    await assert_error(response, 503, "storage_unavailable")
    store.heal()
    assert await get_body(client, "f.bin") == b"f" * KiB


async def test_store_failure_before_the_first_byte_answers_503_json(
    client: Client, store: FaultyBackend
) -> None:
    await put_ok(client, "f.bin", b"f" * (256 * KiB))
    store.read_fault = reset
    store.read_after = 0
    response = await client.get(URL + "f.bin")
    await assert_error(response, 503, "storage_unavailable")
    store.heal()
    assert await get_body(client, "f.bin") == b"f" * (256 * KiB)


@pytest.mark.parametrize("fault", [reset, refused], ids=["reset", "refused"])
async def test_store_failure_after_some_bytes_cuts_the_download(
    client: Client, store: FaultyBackend, fault: Fault
) -> None:
    data = bytes(range(256)) * (8 * KiB)  # 2 MiB, more than one chunk of the store
    await put_ok(client, "big.bin", data)
    await put_ok(client, "other.txt", b"other")
    store.read_fault = fault
    store.read_after = 100 * KiB
    response = await client.get(URL + "big.bin")
    assert response.status == 200  # the status line was out before the store failed
    assert response.content_length == len(data)
    try:
        received = await response.read()
    except aiohttp.ClientPayloadError:
        pass  # the connection was cut short of Content-Length: the honest signal
    else:
        # Never a complete-looking body.
        assert len(received) < len(data)
    response.close()

    # The gateway keeps serving, even reads of other objects while the fault is on.
    assert await get_body(client, "other.txt") == b"other"
    assert (await client.get("/health/live")).status == 200
    store.heal()
    assert await get_body(client, "big.bin") == data


async def test_store_failure_mid_range_download_cuts_the_download(
    client: Client, store: FaultyBackend
) -> None:
    data = b"r" * (2 * MiB)
    await put_ok(client, "big.bin", data)
    store.read_fault = reset
    store.read_after = 10 * KiB
    response = await client.get(URL + "big.bin", headers={"Range": "bytes=1000-"})
    assert response.status == 206
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    response.close()
    store.heal()
    response = await client.get(URL + "big.bin", headers={"Range": "bytes=1000-"})
    assert response.status == 206
    assert await response.read() == data[1000:]


# -- metadata, listings, readiness -----------------------------------------------------------


async def test_metadata_failures_answer_503_and_recover(
    client: Client, store: FaultyBackend
) -> None:
    await put_ok(client, "a/b.txt", b"b")
    store.meta_fault = refused
    await assert_error(await client.get("/api/v1/acme/stats/a/b.txt"), 503, "storage_unavailable")
    await assert_error(await client.get("/api/v1/acme/list/a"), 503, "storage_unavailable")
    await assert_error(
        await client.get("/api/v1/acme/list?recursive=true"), 503, "storage_unavailable"
    )
    assert (await client.get("/health/live")).status == 200
    assert await get_body(client, "a/b.txt") == b"b"  # reads do not need info
    store.heal()
    assert (await client.get("/api/v1/acme/stats/a/b.txt")).status == 200
    listing = await (await client.get("/api/v1/acme/list/a")).json()
    assert [entry["key"] for entry in listing["entries"]] == ["a/b.txt"]


@pytest.mark.parametrize("fault", [reset, refused, io_error], ids=["reset", "refused", "eio"])
async def test_readiness_answers_503_while_the_store_fails(
    client: Client, store: FaultyBackend, fault: Fault
) -> None:
    assert (await client.get("/health/ready")).status == 200
    store.meta_fault = fault
    await assert_error(await client.get("/health/ready"), 503, "storage_unavailable")
    assert (await client.get("/health/live")).status == 200
    store.heal()
    response = await client.get("/health/ready")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


# -- a real full disk ------------------------------------------------------------------------


@pytest.fixture
def small_file_system(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (skips where mounting is not allowed)."""
    with mounted_tmpfs(tmp_path / "small", "2m") as mount_point:
        yield mount_point


def temp_files(base: Path) -> list[str]:
    root = base / TMP_DIR
    return [
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != LOCK_NAME
    ]


def data_files(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in (base / "tenants").rglob("*") if p.is_file())


async def test_real_full_disk_answers_507_and_leaves_nothing(
    small_file_system: Path, aiohttp_client: AiohttpClient
) -> None:
    base = small_file_system / "data"
    app = create_app(settings(**{"storage.type": "local", "storage.local.base-path": str(base)}))
    try:
        client = await aiohttp_client(app)
    except ValueError as exc:  # LocalBackend.start refuses a file system without user xattrs
        pytest.skip(f"this kernel's tmpfs cannot hold the local backend: {exc}")
    await put_ok(client, "keep.bin", b"k" * (256 * KiB))

    response = await client.put(URL + "huge.bin", data=io.BytesIO(b"h" * (4 * MiB)))
    await assert_error(response, 507, "insufficient_storage")
    assert (await client.get(URL + "huge.bin")).status == 404
    assert data_files(base) == ["tenants/acme/keep.bin"]
    assert temp_files(base) == []

    # An overwrite that does not fit keeps the old version.
    response = await client.put(URL + "keep.bin", data=io.BytesIO(b"n" * (4 * MiB)))
    await assert_error(response, 507, "insufficient_storage")
    assert await get_body(client, "keep.bin") == b"k" * (256 * KiB)
    assert temp_files(base) == []

    # The gateway keeps serving, and the failed uploads gave their space back.
    assert (await client.get("/health/live")).status == 200
    assert (await client.get("/health/ready")).status == 200
    await put_ok(client, "after.bin", b"a" * (512 * KiB))
    assert await get_body(client, "after.bin") == b"a" * (512 * KiB)
    assert data_files(base) == ["tenants/acme/after.bin", "tenants/acme/keep.bin"]


async def test_readiness_answers_503_when_the_store_hangs(
    client: Client, store: FaultyBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.app.READY_TIMEOUT", 0.2)
    hang = asyncio.Event()

    async def hanging_info(key: str) -> Info:
        await hang.wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(store, "info", hanging_info)
    await assert_error(await client.get("/health/ready"), 503, "storage_unavailable")
    assert (await client.get("/health/live")).status == 200
    monkeypatch.undo()
    hang.set()
    assert (await client.get("/health/ready")).status == 200


async def test_whole_store_down_answers_503_and_recovers(
    client: Client, store: FaultyBackend
) -> None:
    await put_ok(client, "kept.txt", b"kept")
    store.whole_store = True
    store.write_fault = store.open_fault = store.meta_fault = refused
    await assert_error(await client.put(URL + "new.txt", data=b"new"), 503, "storage_unavailable")
    await assert_error(await client.get(URL + "kept.txt"), 503, "storage_unavailable")
    await assert_error(await client.get("/api/v1/acme/list"), 503, "storage_unavailable")
    await assert_error(await client.get("/health/ready"), 503, "storage_unavailable")
    assert (await client.get("/health/live")).status == 200
    await asyncio.sleep(1.2)  # a registry refresh (every auth.cache-seconds) fails meanwhile

    store.heal()
    store.whole_store = False
    assert (await client.get("/health/ready")).status == 200
    await put_ok(client, "new.txt", b"new")
    assert await get_body(client, "new.txt") == b"new"
    assert await get_body(client, "kept.txt") == b"kept"
    assert await tenant_keys(store) == ["tenants/acme/kept.txt", "tenants/acme/new.txt"]


async def test_unexpected_error_mid_download_still_cuts_the_connection(
    client: Client, store: FaultyBackend
) -> None:
    data = b"u" * (2 * MiB)
    await put_ok(client, "big.bin", data)
    store.read_fault = lambda: RuntimeError("a bug in a backend")
    store.read_after = 10 * KiB
    response = await client.get(URL + "big.bin")
    assert response.status == 200
    try:
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), 2)
    finally:
        response.close()
