"""What only the S3 backend does: multipart uploads, the key prefix, S3's 1,000-key pages,
conditional writes, markers, copies, and the store's own errors.

The behaviour every backend shares is the conformance suite's; these tests run against moto's
server mode (a real HTTP endpoint in a subprocess) and look at the bucket with boto3.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from backends.base import Info
from backends.s3 import S3Backend
from tests.support.moto import (
    ACCESS_KEY,
    SECRET_KEY,
    MotoServer,
    isolate_aws_env,
    make_bucket,
    s3_client,
)
from tests.support.ports import free_port

MiB = 1024 * 1024
BUCKET = "gateway-test"
PART = 5 * MiB  # S3's (and moto's) smallest part


@pytest.fixture(autouse=True)
def _no_user_aws_config(monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_aws_env(monkeypatch)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def endpoint(s3_server: MotoServer) -> str:
    """A moto endpoint holding one empty bucket, ``BUCKET``."""
    s3_server.reset()
    assert s3_server.endpoint is not None
    make_bucket(s3_server.endpoint, BUCKET)
    return s3_server.endpoint


@pytest.fixture
def client(endpoint: str) -> Iterator[Any]:
    """A boto3 client, to see the bucket as it is."""
    boto = s3_client(endpoint)
    yield boto
    boto.close()


def make_backend(endpoint: str, **options: Any) -> S3Backend:
    settings: dict[str, Any] = {
        "endpoint": endpoint,
        "region": "us-east-1",
        "access_key": ACCESS_KEY,
        "secret_key": SECRET_KEY,
        "force_path_style": True,
        "part_size": PART,
    }
    settings.update(options)
    return S3Backend(BUCKET, **settings)


@pytest.fixture
async def backend(endpoint: str) -> AsyncIterator[S3Backend]:
    store = make_backend(endpoint)
    await store.start()
    yield store
    await store.close()


async def body(data: bytes, chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), chunk):
        yield data[start : start + chunk]


async def read_all(store: S3Backend, key: str) -> bytes:
    async with await store.open_read(key) as reader:
        return b"".join([chunk async for chunk in reader.chunks()])


def keys_in(client: Any, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", ()))
    return keys


def pending_uploads(client: Any) -> list[Any]:
    uploads: list[Any] = client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    return uploads


def record_calls(monkeypatch: pytest.MonkeyPatch, store: S3Backend) -> list[str]:
    """Return the list of S3 operations ``store`` calls from now on (kept up to date)."""
    calls: list[str] = []
    real = store._call

    async def recording(op: str, key: str, **kwargs: Any) -> Any:
        calls.append(op)
        return await real(op, key, **kwargs)

    monkeypatch.setattr(store, "_call", recording)
    return calls


def put_many(client: Any, keys: list[str]) -> None:
    """Store each key (its name as its content) straight into the bucket, 16 at a time."""
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=key), keys))


async def write_many(store: S3Backend, keys: list[str], concurrency: int = 32) -> None:
    limiter = asyncio.Semaphore(concurrency)

    async def one(key: str) -> Info:
        async with limiter:
            return await store.write(key, body(key.encode()))

    await asyncio.gather(*(one(key) for key in keys))


# -- multipart uploads --------------------------------------------------------------------------


async def test_large_write_goes_in_parts_and_round_trips(
    backend: S3Backend, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(20 * MiB)
    calls = record_calls(monkeypatch, backend)

    info = await backend.write("big.bin", body(data), content_type="application/x-test")

    assert calls.count("upload_part") == 4
    assert "put_object" not in calls

    assert info.size == len(data)
    assert info.etag is not None and info.etag.endswith("-4")  # four 5 MiB parts
    assert info.content_type == "application/x-test"
    got = await read_all(backend, "big.bin")
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    assert pending_uploads(client) == []


async def test_large_write_holds_at_most_two_parts(
    backend: S3Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploaded = 0
    most_ahead = 0
    real_call = backend._call

    async def counting(op: str, key: str, **kwargs: Any) -> Any:
        nonlocal uploaded
        response = await real_call(op, key, **kwargs)
        if op == "upload_part":
            uploaded += len(kwargs["Body"])
        return response

    async def watched() -> AsyncIterator[bytes]:
        nonlocal most_ahead
        for produced in range(0, 30 * MiB, MiB):
            most_ahead = max(most_ahead, produced - uploaded)
            yield os.urandom(MiB)

    monkeypatch.setattr(backend, "_call", counting)
    await backend.write("streamed.bin", watched())

    # the part on its way to S3, plus the next one filling up (and one chunk over it)
    assert most_ahead <= 2 * PART + MiB


async def test_write_of_one_part_or_less_is_a_single_put(backend: S3Backend) -> None:
    data = os.urandom(PART)

    info = await backend.write("one.bin", body(data))

    assert info.etag is not None and "-" not in info.etag
    assert await read_all(backend, "one.bin") == data


async def test_ranged_read_across_parts_returns_exact_bytes(backend: S3Backend) -> None:
    data = os.urandom(11 * MiB + 3)
    await backend.write("r.bin", body(data))

    async with await backend.open_read("r.bin") as reader:
        middle = b"".join([c async for c in reader.chunks(PART - 10, 2 * PART + 10)])
        empty = [c async for c in reader.chunks(7, 7)]

    assert middle == data[PART - 10 : 2 * PART + 10]
    assert empty == []


async def test_failing_body_leaves_no_object_and_no_upload(
    backend: S3Backend, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_calls(monkeypatch, backend)

    async def breaks_after_two_parts() -> AsyncIterator[bytes]:
        for _ in range(2 * PART // MiB + 1):
            yield os.urandom(MiB)
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        await backend.write("broken.bin", breaks_after_two_parts())

    assert calls.count("create_multipart_upload") == calls.count("abort_multipart_upload") == 1
    assert keys_in(client) == []
    assert pending_uploads(client) == []


async def test_failing_overwrite_keeps_the_old_object(backend: S3Backend, client: Any) -> None:
    await backend.write("keep.txt", body(b"old"))

    async def breaks() -> AsyncIterator[bytes]:
        yield os.urandom(3 * PART)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await backend.write("keep.txt", breaks())

    assert await read_all(backend, "keep.txt") == b"old"
    assert pending_uploads(client) == []


async def test_cancelled_write_aborts_its_upload(
    backend: S3Backend, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_calls(monkeypatch, backend)
    two_parts_sent = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield os.urandom(3 * PART)
        two_parts_sent.set()
        await asyncio.Event().wait()  # never
        yield b""

    task = asyncio.create_task(backend.write("stalled.bin", stalls()))
    await two_parts_sent.wait()
    while "upload_part" not in calls:  # the first part is on its way
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert "abort_multipart_upload" in calls

    assert keys_in(client) == []
    assert pending_uploads(client) == []


# -- conditional writes -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [10, 2 * PART + 1], ids=["put", "multipart"])
async def test_exclusive_write_over_an_object_raises_file_exists(
    backend: S3Backend, client: Any, size: int
) -> None:
    await backend.write("x.bin", body(b"first"))

    with pytest.raises(FileExistsError):
        await backend.write("x.bin", body(os.urandom(size)), exclusive=True)

    assert await read_all(backend, "x.bin") == b"first"
    assert pending_uploads(client) == []


@pytest.mark.parametrize("size", [10, 2 * PART + 1], ids=["put", "multipart"])
async def test_exclusive_write_is_refused_by_the_store_itself(
    backend: S3Backend, client: Any, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """The HEAD before an exclusive write only fails early: If-None-Match decides."""
    await backend.write("race.bin", body(b"first"))

    async def sees_nothing(key: str) -> None:
        return None

    monkeypatch.setattr(backend, "_head", sees_nothing)  # as if the other write came later
    with pytest.raises(FileExistsError):
        await backend.write("race.bin", body(os.urandom(size)), exclusive=True)

    assert client.get_object(Bucket=BUCKET, Key="race.bin")["Body"].read() == b"first"
    assert pending_uploads(client) == []


async def test_reader_refuses_an_object_replaced_after_open(backend: S3Backend) -> None:
    await backend.write("v.txt", body(b"version one"))

    async with await backend.open_read("v.txt") as reader:
        await backend.write("v.txt", body(b"version two"))
        with pytest.raises(ConnectionError):
            _ = [chunk async for chunk in reader.chunks()]


# -- the key prefix -----------------------------------------------------------------------------


async def test_path_prefix_holds_every_object_and_is_hidden(endpoint: str, client: Any) -> None:
    client.put_object(Bucket=BUCKET, Key="elsewhere/other.txt", Body=b"not ours")
    store = make_backend(endpoint, path="/gateway/data/")
    await store.start()
    try:
        await store.write("ns/a.txt", body(b"a"))
        await store.mkdir("empty")

        assert sorted(keys_in(client, "gateway/")) == [
            "gateway/data/empty/",
            "gateway/data/ns/a.txt",
        ]
        top = await store.list("")
        assert [(e.name, e.type) for e in top.entries] == [
            ("empty", "directory"),
            ("ns", "directory"),
        ]
        everything = await store.list("", recursive=True)
        assert [e.name for e in everything.entries] == ["ns/a.txt"]
        assert (await store.info("ns/a.txt")).name == "ns/a.txt"
        assert await store.delete_prefix("ns") == 1
        assert keys_in(client, "elsewhere/") == ["elsewhere/other.txt"]
    finally:
        await store.close()


@pytest.mark.parametrize("path", ["a//b", "a/../b", "./a"])
def test_path_prefix_with_odd_segments_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="path"):
        S3Backend(BUCKET, path=path)


# -- 1,000-key pages ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_listing_and_delete_prefix_go_past_1000_keys(backend: S3Backend, client: Any) -> None:
    keys = [f"many/k{i:04d}" for i in range(1100)]
    await asyncio.to_thread(put_many, client, keys)  # moto takes ~10 ms a request

    whole = await backend.list("many", limit=5000)
    first = await backend.list("many", limit=1000)
    rest = await backend.list("many", limit=1000, start_after=first.next_cursor)
    recursive = await backend.list("", recursive=True, limit=5000)

    assert [e.name for e in whole.entries] == keys
    assert whole.next_cursor is None
    assert first.next_cursor == "many/k0999"
    assert [e.name for e in first.entries + rest.entries] == keys
    assert rest.next_cursor is None
    assert [e.name for e in recursive.entries] == keys

    assert await backend.delete_prefix("many") == 1100
    assert keys_in(client) == []
    with pytest.raises(FileNotFoundError):
        await backend.delete_prefix("many")


async def test_one_level_pages_step_over_whole_directories(backend: S3Backend) -> None:
    await write_many(backend, ["d/a", "d/b/x", "d/b/y", "d/b/z/deep", "d/b0", "d/c"])
    names: list[tuple[str, str]] = []
    cursor = None
    while True:
        page = await backend.list("d", limit=1, start_after=cursor)
        names.extend((e.name, e.type) for e in page.entries)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor

    assert names == [
        ("d/a", "file"),
        ("d/b", "directory"),
        ("d/b0", "file"),
        ("d/c", "file"),
    ]
    assert (await backend.list("d", start_after="d/b/")).entries[0].name == "d/b0"


async def test_cursor_with_characters_s3_cannot_echo_still_pages(backend: S3Backend) -> None:
    """S3 repeats StartAfter in its XML answer, which cannot carry NUL or other controls."""
    await write_many(backend, ["d/a", "d/b/x", "d/c"])

    after_nul = await backend.list("d", start_after="d/\x00")
    inside_b = await backend.list("d", start_after="d/b/\x01")
    recursive = await backend.list("d", recursive=True, start_after="d/b/\x1f")

    assert [e.name for e in after_nul.entries] == ["d/a", "d/b", "d/c"]
    assert [e.name for e in inside_b.entries] == ["d/c"]
    assert [e.name for e in recursive.entries] == ["d/b/x", "d/c"]


# -- directories --------------------------------------------------------------------------------


async def test_mkdir_writes_a_marker_that_never_lists_as_a_file(
    backend: S3Backend, client: Any
) -> None:
    await backend.mkdir("box")

    assert keys_in(client) == ["box/"]
    assert (await backend.info("box")).is_dir
    assert (await backend.list("box")).entries == []
    assert (await backend.list("", recursive=True)).entries == []
    with pytest.raises(IsADirectoryError):
        await backend.write("box", body(b"x"))
    await backend.write("box/f", body(b"x"))
    assert [e.name for e in (await backend.list("box")).entries] == ["box/f"]
    assert await backend.delete_prefix("box") == 1
    assert keys_in(client) == []


async def test_directory_without_marker_vanishes_with_its_last_file(backend: S3Backend) -> None:
    await backend.write("tmp/only", body(b"x"))
    await backend.delete("tmp/only")

    assert not await backend.exists("tmp")
    with pytest.raises(FileNotFoundError):
        await backend.list("tmp")


# -- moves --------------------------------------------------------------------------------------


async def test_move_of_a_directory_of_50_keys(backend: S3Backend, client: Any) -> None:
    keys = [f"src/{'sub/' if i % 5 == 0 else ''}k{i:02d}" for i in range(50)]
    await write_many(backend, keys)
    await backend.mkdir("src/empty")
    await backend.write(
        "src/typed", body(b"t"), content_type="text/plain", metadata={"owner": "ana"}
    )

    await backend.move("src", "dst")

    assert keys_in(client, "src/") == []
    moved = sorted(keys_in(client, "dst/"))
    assert moved == sorted(["dst/" + k[len("src/") :] for k in keys] + ["dst/empty/", "dst/typed"])
    assert await read_all(backend, "dst/k01") == b"src/k01"
    typed = await backend.info("dst/typed")
    assert (typed.content_type, dict(typed.metadata)) == ("text/plain", {"owner": "ana"})


async def test_failed_directory_move_removes_its_copies_and_keeps_the_sources(
    backend: S3Backend, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"src/k{i:02d}" for i in range(20)]
    await write_many(backend, keys)
    real_copy = backend._copy

    async def copy_fails_once(key: str, source: str, target: str, *args: Any) -> None:
        if source.endswith("k07"):
            raise PermissionError(13, "copy refused")
        await real_copy(key, source, target, *args)

    monkeypatch.setattr(backend, "_copy", copy_fails_once)
    with pytest.raises(PermissionError, match="copy refused"):  # itself, not an ExceptionGroup
        await backend.move("src", "dst")

    assert sorted(keys_in(client)) == keys


async def test_move_onto_an_existing_directory_raises_file_exists(backend: S3Backend) -> None:
    await write_many(backend, ["a/1", "b/2"])

    with pytest.raises(FileExistsError):
        await backend.move("a", "b")
    with pytest.raises(OSError, match="into itself"):
        await backend.move("a", "a/inner")

    assert [e.name for e in (await backend.list("", recursive=True)).entries] == ["a/1", "b/2"]


async def test_move_of_a_large_file_copies_part_by_part(backend: S3Backend, client: Any) -> None:
    backend.multipart_copy_threshold = 6 * MiB  # instead of S3's 5 GiB
    backend.copy_part_size = PART
    data = os.urandom(12 * MiB)
    await backend.write("huge", body(data), content_type="video/mp4", metadata={"k": "v"})

    await backend.move("huge", "moved")

    info = await backend.info("moved")
    assert info.etag is not None and info.etag.endswith("-3")
    assert (info.content_type, dict(info.metadata)) == ("video/mp4", {"k": "v"})
    assert hashlib.sha256(await read_all(backend, "moved")).digest() == (
        hashlib.sha256(data).digest()
    )
    assert keys_in(client) == ["moved"]
    assert pending_uploads(client) == []


async def test_closing_a_reader_mid_read_stops_it(backend: S3Backend) -> None:
    await backend.write("c.bin", body(os.urandom(3 * MiB)))
    reader = await backend.open_read("c.bin")
    chunks = reader.chunks()

    assert len(await anext(chunks)) == MiB
    await reader.close()
    with pytest.raises(ValueError, match="closed"):
        await anext(chunks)
    await reader.close()  # twice is fine


# -- metadata -----------------------------------------------------------------------------------


async def test_metadata_names_are_lowercased_and_values_survive_non_ascii(
    backend: S3Backend,
) -> None:
    metadata = {"Author": "Zoë Ñúñez", "plain": "a b", "edge": " spaced "}

    written = await backend.write("m.txt", body(b"m"), metadata=metadata)
    read = await backend.info("m.txt")

    expected = {"author": "Zoë Ñúñez", "plain": "a b", "edge": " spaced "}
    assert dict(written.metadata) == expected
    assert dict(read.metadata) == expected


async def test_write_without_content_type_reads_back_none(backend: S3Backend) -> None:
    """S3 stores such objects as binary/octet-stream; the backend reports "not recorded"."""
    await backend.write("plain", body(b"p"))

    assert (await backend.info("plain")).content_type is None


# -- the store's own errors ---------------------------------------------------------------------


async def test_ready_with_a_missing_bucket_raises_a_store_error(endpoint: str) -> None:
    store = S3Backend(
        "no-such-bucket",
        endpoint=endpoint,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        force_path_style=True,
    )
    try:
        with pytest.raises(OSError, match="NoSuchBucket") as caught:
            await store.ready()
        assert not isinstance(caught.value, FileNotFoundError)  # not a 404 for one object
        assert caught.value.__cause__ is not None
        with pytest.raises(OSError, match="NoSuchBucket"):
            await store.start()
    finally:
        await store.close()


async def test_ready_with_wrong_credentials_raises_permission_error() -> None:
    secret = "not-the-secret-0123456789"
    with MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as strict:
        assert strict.endpoint is not None
        store = S3Backend(
            BUCKET,
            endpoint=strict.endpoint,
            access_key="AKIAWRONGWRONGWRONG0",
            secret_key=secret,
            force_path_style=True,
        )
        try:
            with pytest.raises(PermissionError) as caught:
                await store.ready()
        finally:
            await store.close()
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value)


async def test_unreachable_endpoint_raises_connection_error() -> None:
    store = make_backend(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    try:
        with pytest.raises(ConnectionError):
            await store.ready()
    finally:
        await store.close()
