"""One conformance suite for every backend: each test runs against ``memory``, ``local`` and
``s3`` (moto in server mode) through the ``backend`` fixture of ``tests/conftest.py``.

Where S3 really differs (its directories are key prefixes) a test reads the backend's
``empty_directories`` flag, and either checks the S3 behaviour instead or skips with the reason,
so the difference shows in the report instead of being hidden.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import random
from collections.abc import AsyncIterator

import pytest

from backends.base import DIRECTORY, FILE, MAX_METADATA_BYTES, Backend, sort_key
from tests.backends.helpers import UploadFailed, body, failing_body, get, names, put
from tests.conftest import Seeder

# The backend fixture lives in the session's event loop (it shares one S3 client).
pytestmark = pytest.mark.asyncio(loop_scope="session")

MiB = 1024 * 1024

# Backends whose open reader keeps serving the version it opened after an overwrite. On S3 a
# reader insists on its ETag instead, so it may fail after an overwrite, but never mixes versions.
SNAPSHOT_READS = {"memory", "local"}


def real_directories(backend: Backend) -> bool:
    """Whether directories are real (a file and a directory cannot share a name), not prefixes."""
    return backend.empty_directories


# -- info, reading, writing --------------------------------------------------------------------


async def test_info_of_root_is_a_directory(backend: Backend) -> None:
    info = await backend.info("")
    assert info.name == ""
    assert info.type == DIRECTORY
    assert info.is_dir
    await backend.ready()


async def test_empty_file_round_trips(backend: Backend) -> None:
    written = await backend.write("e/empty.bin", body())
    assert written.size == 0
    assert written.type == FILE
    info = await backend.info("e/empty.bin")
    assert (info.type, info.size) == (FILE, 0)
    assert await get(backend, "e/empty.bin") == b""
    await put(backend, "e/empty-chunk.bin", b"")
    assert await get(backend, "e/empty-chunk.bin") == b""


@pytest.mark.slow
async def test_large_object_streamed_in_chunks_reads_back_intact(backend: Backend) -> None:
    size = 64 * MiB + 12_345
    piece = MiB + 7  # not a multiple of any buffer or part size
    digest = hashlib.sha256()
    block = random.Random(20240601).randbytes(piece)

    async def generate() -> AsyncIterator[bytes]:
        # One random block, stamped with its index: a chunk lost, repeated or misplaced
        # changes the digest, and no 64 MiB is ever held here.
        left, index = size, 0
        while left:
            chunk = (index.to_bytes(8, "big") + block[8:])[: min(piece, left)]
            digest.update(chunk)
            left -= len(chunk)
            index += 1
            yield chunk

    written = await backend.write("big/object.bin", generate())
    assert written.size == size
    assert (await backend.info("big/object.bin")).size == size
    expected = digest.hexdigest()

    readback = hashlib.sha256()
    total = 0
    async with await backend.open_read("big/object.bin") as reader:
        assert reader.info.size == size
        async for chunk in reader.chunks():
            total += len(chunk)
            readback.update(chunk)
    assert total == size
    assert readback.hexdigest() == expected


async def test_ranges_return_exactly_the_requested_bytes(backend: Backend) -> None:
    data = random.Random(7).randbytes(2 * MiB + 17)
    size = len(data)
    await put(backend, "r/data.bin", data)
    ranges = [
        (0, 0),  # empty, at the start
        (0, 1),
        (0, 100),
        (1000, 1000),  # empty, in the middle
        (MiB - 10, MiB + 10),  # across a megabyte boundary
        (12_345, 2 * MiB),
        (size - 1, size),  # the last byte
        (size, size),  # empty, at the end
        (0, size),
    ]
    async with await backend.open_read("r/data.bin") as reader:
        for start, end in ranges:
            got = b"".join([chunk async for chunk in reader.chunks(start, end)])
            assert got == data[start:end], (start, end)
        tail = b"".join([chunk async for chunk in reader.chunks(size - 5)])
        assert tail == data[-5:]
        assert b"".join([chunk async for chunk in reader.chunks()]) == data


async def test_content_type_and_metadata_round_trip(backend: Backend) -> None:
    metadata = {"owner": "zoë", "note": "été ☃ 数据", "plain": "ascii"}
    written = await put(
        backend, "m/report.csv", b"a,b\n", content_type="text/csv; charset=utf-8", metadata=metadata
    )
    assert written.content_type == "text/csv; charset=utf-8"
    assert dict(written.metadata) == metadata
    info = await backend.info("m/report.csv")
    assert info.content_type == "text/csv; charset=utf-8"
    assert dict(info.metadata) == metadata
    async with await backend.open_read("m/report.csv") as reader:
        assert reader.info.content_type == "text/csv; charset=utf-8"
        assert dict(reader.info.metadata) == metadata


async def test_metadata_names_come_back_lowercased(backend: Backend) -> None:
    # S3 lowercases them (they travel as x-amz-meta-* headers); every backend does the same.
    written = await put(backend, "m/case", b"x", metadata={"Mixed-Case": "Value Kept"})
    assert dict(written.metadata) == {"mixed-case": "Value Kept"}
    assert dict((await backend.info("m/case")).metadata) == {"mixed-case": "Value Kept"}


@pytest.mark.parametrize(
    "metadata",
    [{"k": "v" * MAX_METADATA_BYTES}, {"bad name": "v"}, {"": "v"}, {"naïve": "v"}],
    ids=["too-big", "space", "empty-name", "non-token"],
)
async def test_invalid_metadata_raises_value_error_and_stores_nothing(
    backend: Backend, metadata: dict[str, str]
) -> None:
    with pytest.raises(ValueError):
        await put(backend, "m/invalid", b"x", metadata=metadata)
    assert not await backend.exists("m/invalid")


async def test_write_without_content_type_or_metadata_records_none(backend: Backend) -> None:
    await put(backend, "m/plain", b"x", content_type="text/plain", metadata={"a": "b"})
    await put(backend, "m/plain", b"y")  # an overwrite replaces the metadata too
    info = await backend.info("m/plain")
    assert dict(info.metadata) == {}
    assert info.content_type in (None, "binary/octet-stream", "application/octet-stream")


async def test_write_returns_the_info_that_info_returns(backend: Backend) -> None:
    written = await put(backend, "w/a.txt", b"hello", content_type="text/plain")
    info = await backend.info("w/a.txt")
    assert (written.name, written.type, written.size) == ("w/a.txt", FILE, 5)
    assert (info.name, info.type, info.size) == ("w/a.txt", FILE, 5)
    assert written.etag is not None and written.etag == info.etag
    assert info.mtime is not None and info.mtime > 0


@pytest.mark.parametrize(
    "key",
    ["données/été ☃.txt", "数据/报告 2024.csv", "emoji/🙂 ok.bin", "mixed/ÅÄÖ/ñ-ß.txt"],
    ids=["french", "cjk", "emoji", "nested"],
)
async def test_non_ascii_keys_round_trip_and_list(backend: Backend, key: str) -> None:
    await put(backend, key, key.encode())
    assert await get(backend, key) == key.encode()
    assert (await backend.info(key)).name == key
    parent = key.rpartition("/")[0]
    assert [e.name for e in (await backend.list(parent)).entries] == [key]
    assert await names(backend, "", recursive=True) == [key]


async def test_overwrite_replaces_content_and_changes_etag(backend: Backend) -> None:
    first = await put(backend, "o/file.txt", b"first version")
    second = await put(backend, "o/file.txt", b"second, longer version")
    assert await get(backend, "o/file.txt") == b"second, longer version"
    assert first.etag != second.etag
    assert (await backend.info("o/file.txt")).etag == second.etag
    third = await put(backend, "o/file.txt", b"third, same len version")
    assert third.etag not in (first.etag, second.etag)


@pytest.mark.parametrize("size", [5, 2 * MiB + 1])  # one chunk; streamed
async def test_write_replacing_tells_the_size_it_replaced(backend: Backend, size: int) -> None:
    data = bytes(random.Random(size).getrandbits(8) for _ in range(64)) * (size // 64 + 1)
    first, replaced = await backend.write_replacing(f"wr{size}/k", body(data[:size]))
    assert replaced is None and first.size == size  # a new key
    second, replaced = await backend.write_replacing(f"wr{size}/k", body(b"shorter"))
    assert replaced == size  # what was there before this write
    assert second.size == 7 and await get(backend, f"wr{size}/k") == b"shorter"
    _, replaced = await backend.write_replacing(f"wr{size}/k", body(data[:size]))
    assert replaced == 7
    _, replaced = await backend.write_replacing(f"wr{size}/new", body(b"n"), exclusive=True)
    assert replaced is None
    with pytest.raises(FileExistsError):
        await backend.write_replacing(f"wr{size}/new", body(b"again"), exclusive=True)
    assert await get(backend, f"wr{size}/new") == b"n"


async def test_exclusive_write_creates_a_new_object(backend: Backend) -> None:
    await put(backend, "x/new.txt", b"created", exclusive=True)
    assert await get(backend, "x/new.txt") == b"created"


async def test_exclusive_write_onto_existing_raises_file_exists_and_keeps_old(
    backend: Backend,
) -> None:
    await put(backend, "x/file.txt", b"old", content_type="text/plain")
    with pytest.raises(FileExistsError):
        await put(backend, "x/file.txt", b"new", exclusive=True)
    assert await get(backend, "x/file.txt") == b"old"
    assert (await backend.info("x/file.txt")).content_type == "text/plain"


async def test_concurrent_exclusive_writes_let_exactly_one_win(backend: Backend) -> None:
    contenders = [f"writer {i}".encode() for i in range(8)]
    results = await asyncio.gather(
        *(put(backend, "x/race.txt", data, exclusive=True) for data in contenders),
        return_exceptions=True,
    )
    winners = [
        data
        for data, r in zip(contenders, results, strict=True)
        if not isinstance(r, BaseException)
    ]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, FileExistsError) for r in losers), losers
    assert await get(backend, "x/race.txt") == winners[0]


async def test_write_whose_chunks_raise_keeps_the_old_object(backend: Backend) -> None:
    old = await put(backend, "f/file.txt", b"old content", content_type="text/plain")
    with pytest.raises(UploadFailed):
        await backend.write("f/file.txt", failing_body(b"new ", b"partial ", b"x" * MiB))
    assert await get(backend, "f/file.txt") == b"old content"
    info = await backend.info("f/file.txt")
    assert (info.size, info.etag, info.content_type) == (old.size, old.etag, "text/plain")


async def test_write_whose_chunks_raise_stores_no_new_object(backend: Backend) -> None:
    await put(backend, "f/other.txt")
    with pytest.raises(UploadFailed):
        await backend.write("f/never.txt", failing_body(b"partial", b"y" * (2 * MiB)))
    with pytest.raises(FileNotFoundError):
        await backend.info("f/never.txt")
    assert await names(backend, "f") == ["f/other.txt"]


async def test_write_whose_chunks_raise_at_once_stores_nothing(backend: Backend) -> None:
    with pytest.raises(UploadFailed):
        await backend.write("g/never.txt", failing_body())
    assert not await backend.exists("g/never.txt")


async def test_reader_info_and_bytes_are_of_the_same_version(backend: Backend) -> None:
    await put(backend, "v/file.txt", b"version one")
    reader = await backend.open_read("v/file.txt")
    try:
        assert reader.info.size == len(b"version one")
        assert reader.info.etag == (await backend.info("v/file.txt")).etag
        await put(backend, "v/file.txt", b"version two, longer")
        try:
            data = b"".join([chunk async for chunk in reader.chunks()])
        except OSError:
            assert backend.protocol not in SNAPSHOT_READS
        else:
            assert data == b"version one"
            assert len(data) == reader.info.size
    finally:
        await reader.close()
        await reader.close()  # safe to call twice
    assert await get(backend, "v/file.txt") == b"version two, longer"


# -- errors of missing keys, files and directories ---------------------------------------------


async def test_info_of_missing_key_raises_file_not_found(backend: Backend) -> None:
    with pytest.raises(FileNotFoundError):
        await backend.info("missing/nothing.txt")
    assert not await backend.exists("missing/nothing.txt")


async def test_open_read_of_missing_key_raises_file_not_found(backend: Backend) -> None:
    await put(backend, "d/present.txt")
    with pytest.raises(FileNotFoundError):
        await backend.open_read("d/absent.txt")


async def test_delete_of_missing_key_raises_file_not_found(backend: Backend) -> None:
    await put(backend, "d/present.txt")
    with pytest.raises(FileNotFoundError):
        await backend.delete("d/absent.txt")
    assert await backend.exists("d/present.txt")


async def test_lookups_below_a_file_raise_file_not_found(backend: Backend) -> None:
    await put(backend, "d/file.txt")
    with pytest.raises(FileNotFoundError):
        await backend.info("d/file.txt/below")
    with pytest.raises(FileNotFoundError):
        await backend.open_read("d/file.txt/below")
    assert not await backend.exists("d/file.txt/below")


async def test_open_read_of_directory_raises_is_a_directory(backend: Backend) -> None:
    await put(backend, "dir/child.txt")
    with pytest.raises(IsADirectoryError):
        await backend.open_read("dir")


async def test_delete_of_directory_raises_is_a_directory(backend: Backend) -> None:
    await put(backend, "dir/child.txt")
    with pytest.raises(IsADirectoryError):
        await backend.delete("dir")
    assert await backend.exists("dir/child.txt")


async def test_write_onto_a_directory_raises_is_a_directory(backend: Backend) -> None:
    await put(backend, "dir/child.txt", b"child")
    with pytest.raises(IsADirectoryError):
        await put(backend, "dir", b"file")
    assert (await backend.info("dir")).is_dir
    assert await get(backend, "dir/child.txt") == b"child"


async def test_write_below_a_file_raises_not_a_directory_where_directories_are_real(
    backend: Backend,
) -> None:
    await put(backend, "plain", b"a file")
    if real_directories(backend):
        with pytest.raises(NotADirectoryError):
            await put(backend, "plain/child.txt", b"below a file")
    else:  # S3: directories are key prefixes, so a file and a directory may share a name
        await put(backend, "plain/child.txt", b"below")
        assert await get(backend, "plain/child.txt") == b"below"
    assert await get(backend, "plain") == b"a file"


async def test_delete_removes_the_file_and_keeps_the_directory_per_flag(backend: Backend) -> None:
    await put(backend, "keep/only.txt")
    await backend.delete("keep/only.txt")
    assert not await backend.exists("keep/only.txt")
    if backend.empty_directories:
        assert (await backend.info("keep")).is_dir
        assert (await backend.list("keep")).entries == []
    else:
        with pytest.raises(FileNotFoundError):
            await backend.info("keep")


async def test_exists_tells_files_directories_and_missing_apart(backend: Backend) -> None:
    await put(backend, "ex/file.txt")
    assert await backend.exists("ex/file.txt")
    assert await backend.exists("ex")
    assert await backend.exists("")
    assert not await backend.exists("ex/none")
    assert not await backend.exists("none")


# -- listings ----------------------------------------------------------------------------------


async def test_1500_keys_page_by_cursor_and_delete_by_prefix(
    backend: Backend, seed: Seeder
) -> None:
    keys = [f"bulk/key-{i:04d}.txt" for i in range(1500)]
    random.Random(3).shuffle(keys)
    await seed({key: key.encode() for key in keys})
    expected = sorted(keys)

    for recursive in (False, True):
        first = await backend.list("bulk", recursive=recursive, limit=1000)
        assert [e.name for e in first.entries] == expected[:1000]
        assert first.next_cursor == expected[999]
        rest = await backend.list("bulk", recursive=recursive, start_after=first.next_cursor)
        assert [e.name for e in rest.entries] == expected[1000:]
        assert rest.next_cursor is None
        assert all(e.type == FILE and e.size == len(e.name) for e in rest.entries)

    assert await backend.delete_prefix("bulk") == 1500
    with pytest.raises(FileNotFoundError):
        await backend.list("bulk")
    assert "bulk" not in await names(backend, "")
    assert not await backend.exists(expected[0])


async def test_one_level_listing_shows_files_and_directories_in_sort_key_order(
    backend: Backend,
) -> None:
    # "-" < "." < "/" < "0": the directory "p/a" sorts as "p/a/", between "p/a.txt" and "p/a0".
    for key in ["p/a0", "p/a.txt", "p/a/inner.txt", "p/b", "p/a-1", "p/sub/deep/x.txt", "p/Z"]:
        await put(backend, key, b"12345")
    page = await backend.list("p")
    assert [(e.name, e.type) for e in page.entries] == [
        ("p/Z", FILE),
        ("p/a-1", FILE),
        ("p/a.txt", FILE),
        ("p/a", DIRECTORY),
        ("p/a0", FILE),
        ("p/b", FILE),
        ("p/sub", DIRECTORY),
    ]
    assert page.next_cursor is None
    assert [sort_key(e) for e in page.entries] == sorted(sort_key(e) for e in page.entries)
    assert all(e.size == 5 for e in page.entries if e.type == FILE)


async def test_one_level_listing_pages_through_directories(backend: Backend) -> None:
    for key in ["p/a.txt", "p/a/inner.txt", "p/a0", "p/b/x", "p/c"]:
        await put(backend, key)
    first = await backend.list("p", limit=2)
    assert [e.name for e in first.entries] == ["p/a.txt", "p/a"]
    assert first.next_cursor == "p/a/"
    second = await backend.list("p", limit=2, start_after=first.next_cursor)
    assert [e.name for e in second.entries] == ["p/a0", "p/b"]
    assert second.next_cursor == "p/b/"
    third = await backend.list("p", limit=2, start_after=second.next_cursor)
    assert [e.name for e in third.entries] == ["p/c"]
    assert third.next_cursor is None


async def test_listing_of_root_shows_top_level_entries(backend: Backend) -> None:
    await put(backend, "top.txt")
    await put(backend, "dir/inner.txt")
    entries = [(e.name, e.type) for e in (await backend.list("")).entries]
    assert ("top.txt", FILE) in entries
    assert ("dir", DIRECTORY) in entries
    assert ("dir/inner.txt", FILE) not in entries


async def test_recursive_listing_returns_only_files_in_key_order(backend: Backend) -> None:
    keys = [
        "t/a.txt", "t/a/b/c.txt", "t/a/b.txt", "t/a0", "t/a-1/x", "t/b/ü.txt", "t/b/z",
        "t/é", "t/数据/f", "t/a/b/c/d/e.txt",
    ]  # fmt: skip
    for key in keys:
        await put(backend, key)
    if real_directories(backend):
        await backend.mkdir("t/empty/dir")
    page = await backend.list("t", recursive=True)
    assert [e.name for e in page.entries] == sorted(keys)
    assert all(e.type == FILE for e in page.entries)
    assert page.next_cursor is None


@pytest.mark.parametrize("limit", [1, 2, 3])
async def test_recursive_listing_pages_in_key_order(backend: Backend, limit: int) -> None:
    keys = ["t/a.txt", "t/a/b/c.txt", "t/a/b.txt", "t/a0", "t/a-1/x", "t/b/z", "t/c"]
    for key in keys:
        await put(backend, key)
    seen: list[str] = []
    cursor = None
    for _ in range(20):
        page = await backend.list("t", recursive=True, limit=limit, start_after=cursor)
        assert len(page.entries) <= limit
        seen += [e.name for e in page.entries]
        cursor = page.next_cursor
        if cursor is None:
            break
        assert cursor == page.entries[-1].name
    assert seen == sorted(keys)


async def test_recursive_listing_starts_after_a_key_inside_a_subtree(backend: Backend) -> None:
    keys = ["t/a/1", "t/a/2", "t/a/b/3", "t/a/c", "t/b/4", "t/c"]
    for key in keys:
        await put(backend, key)
    page = await backend.list("t", recursive=True, start_after="t/a/b/")
    assert [e.name for e in page.entries] == ["t/a/b/3", "t/a/c", "t/b/4", "t/c"]
    page = await backend.list("t", recursive=True, start_after="t/a/zzz")
    assert [e.name for e in page.entries] == ["t/b/4", "t/c"]


async def test_listing_with_a_limit_below_one_raises_value_error(backend: Backend) -> None:
    await put(backend, "l/file.txt")
    with pytest.raises(ValueError):
        await backend.list("l", limit=0)


async def test_listing_a_file_raises_not_a_directory(backend: Backend) -> None:
    await put(backend, "l/file.txt")
    with pytest.raises(NotADirectoryError):
        await backend.list("l/file.txt")


async def test_listing_a_missing_directory_raises_file_not_found(backend: Backend) -> None:
    await put(backend, "l/file.txt")
    with pytest.raises(FileNotFoundError):
        await backend.list("l/nothing")
    with pytest.raises(FileNotFoundError):
        await backend.list("nothing", recursive=True)


# -- directories -------------------------------------------------------------------------------


async def test_mkdir_creates_a_directory_listed_in_its_parent(backend: Backend) -> None:
    await backend.mkdir("k/new/dir")
    assert (await backend.info("k/new/dir")).is_dir
    assert (await backend.info("k/new")).is_dir
    assert [(e.name, e.type) for e in (await backend.list("k/new")).entries] == [
        ("k/new/dir", DIRECTORY)
    ]
    assert (await backend.list("k/new/dir")).entries == []


async def test_mkdir_of_an_existing_directory_succeeds(backend: Backend) -> None:
    await put(backend, "k/dir/file.txt", b"kept")
    await backend.mkdir("k/dir")
    await backend.mkdir("k/dir")
    assert await get(backend, "k/dir/file.txt") == b"kept"


async def test_mkdir_where_a_file_is_raises_file_exists(backend: Backend) -> None:
    await put(backend, "k/file", b"kept")
    with pytest.raises(FileExistsError):
        await backend.mkdir("k/file")
    assert await get(backend, "k/file") == b"kept"


async def test_mkdir_below_a_file_raises_not_a_directory_where_directories_are_real(
    backend: Backend,
) -> None:
    await put(backend, "k/file")
    if real_directories(backend):
        with pytest.raises(NotADirectoryError):
            await backend.mkdir("k/file/sub")
    else:  # S3: the marker "k/file/sub/" may sit beside the object "k/file"
        await backend.mkdir("k/file/sub")
        assert (await backend.info("k/file/sub")).is_dir
    assert not (await backend.info("k/file")).is_dir


async def test_delete_prefix_removes_a_tree_and_counts_its_files(backend: Backend) -> None:
    for key in ["tree/a", "tree/b/c", "tree/b/d/e", "treehouse/kept"]:
        await put(backend, key)
    assert await backend.delete_prefix("tree") == 3
    assert not await backend.exists("tree")
    assert await backend.exists("treehouse/kept")  # a sibling sharing the prefix stays


async def test_delete_prefix_of_a_file_raises_not_a_directory(backend: Backend) -> None:
    await put(backend, "dp/file")
    with pytest.raises(NotADirectoryError):
        await backend.delete_prefix("dp/file")
    assert await backend.exists("dp/file")


async def test_delete_prefix_of_a_missing_directory_raises_file_not_found(
    backend: Backend,
) -> None:
    with pytest.raises(FileNotFoundError):
        await backend.delete_prefix("dp/none")


# -- moves -------------------------------------------------------------------------------------


async def test_move_of_a_file_moves_content_and_metadata(backend: Backend) -> None:
    await put(backend, "mv/src.txt", b"payload", content_type="text/plain", metadata={"k": "vé"})
    await backend.move("mv/src.txt", "mv/other/dst.txt")
    assert not await backend.exists("mv/src.txt")
    assert await get(backend, "mv/other/dst.txt") == b"payload"
    info = await backend.info("mv/other/dst.txt")
    assert info.name == "mv/other/dst.txt"
    assert info.content_type == "text/plain"
    assert dict(info.metadata) == {"k": "vé"}


async def test_move_of_a_directory_moves_every_child(backend: Backend) -> None:
    children = ["a.txt", "b/c.txt", "b/d/e.txt", "z"]
    for child in children:
        await put(backend, f"mvd/src/{child}", child.encode())
    await put(backend, "mvd/srcfile", b"not a child")
    await backend.move("mvd/src", "mvd/moved/here")
    assert await names(backend, "mvd/moved/here", recursive=True) == sorted(
        f"mvd/moved/here/{child}" for child in children
    )
    for child in children:
        assert await get(backend, f"mvd/moved/here/{child}") == child.encode()
    assert not await backend.exists("mvd/src")
    assert not await backend.exists("mvd/src/a.txt")
    assert await names(backend, "mvd", recursive=True) == [
        *sorted(f"mvd/moved/here/{child}" for child in children),
        "mvd/srcfile",
    ]


async def test_move_onto_an_existing_file_raises_file_exists(backend: Backend) -> None:
    await put(backend, "mv/a", b"a")
    await put(backend, "mv/b", b"b")
    with pytest.raises(FileExistsError):
        await backend.move("mv/a", "mv/b")
    assert await get(backend, "mv/a") == b"a"
    assert await get(backend, "mv/b") == b"b"


async def test_move_onto_an_existing_directory_raises_file_exists(backend: Backend) -> None:
    await put(backend, "mv/a", b"a")
    await put(backend, "mv/dir/x", b"x")
    await put(backend, "mv/src/y", b"y")
    with pytest.raises(FileExistsError):
        await backend.move("mv/a", "mv/dir")
    with pytest.raises(FileExistsError):
        await backend.move("mv/src", "mv/dir")
    assert await get(backend, "mv/a") == b"a"
    assert await names(backend, "mv/dir") == ["mv/dir/x"]
    assert await names(backend, "mv/src") == ["mv/src/y"]


async def test_move_onto_an_empty_directory_raises_file_exists(backend: Backend) -> None:
    # A plain rename(2) would silently replace an empty directory.
    await put(backend, "mv/src/y", b"y")
    await put(backend, "mv/file", b"f")
    await backend.mkdir("mv/empty")
    with pytest.raises(FileExistsError):
        await backend.move("mv/src", "mv/empty")
    with pytest.raises(FileExistsError):
        await backend.move("mv/file", "mv/empty")
    assert await names(backend, "mv/src") == ["mv/src/y"]
    assert await get(backend, "mv/file") == b"f"
    assert (await backend.info("mv/empty")).is_dir


async def test_move_of_a_missing_source_raises_file_not_found(backend: Backend) -> None:
    with pytest.raises(FileNotFoundError):
        await backend.move("mv/none", "mv/dst")
    assert not await backend.exists("mv/dst")


async def test_move_of_a_directory_into_itself_is_refused(backend: Backend) -> None:
    await put(backend, "mv/dir/x", b"x")
    with pytest.raises(OSError) as raised:
        await backend.move("mv/dir", "mv/dir/inside")
    assert raised.value.errno == errno.EINVAL
    assert await get(backend, "mv/dir/x") == b"x"


# -- copy and conditional delete (data lifecycle: migration, purge) ----------------------------


async def test_copy_makes_an_identical_file_and_keeps_the_source(backend: Backend) -> None:
    source = await put(backend, "c/src.csv", b"a,b\n1,2\n", content_type="text/csv",
                       metadata={"execution": "e1"})  # fmt: skip
    copied = await backend.copy("c/src.csv", "d/dst.csv")
    assert (copied.name, copied.size) == ("d/dst.csv", source.size)
    assert await get(backend, "d/dst.csv") == b"a,b\n1,2\n"
    info = await backend.info("d/dst.csv")
    assert (info.content_type, dict(info.metadata)) == ("text/csv", {"execution": "e1"})
    assert await get(backend, "c/src.csv") == b"a,b\n1,2\n"


async def test_copy_of_a_missing_source_raises_file_not_found(backend: Backend) -> None:
    with pytest.raises(FileNotFoundError):
        await backend.copy("c/none", "c/other")
    assert not await backend.exists("c/other")


async def test_delete_if_unchanged_deletes_the_version_it_was_given(backend: Backend) -> None:
    info = await put(backend, "p/old.bin", b"old")
    listed = (await backend.list("p")).entries[0]
    assert await backend.delete_if_unchanged("p/old.bin", listed) is True
    assert not await backend.exists("p/old.bin")
    assert info.size == 3
    assert await backend.delete_if_unchanged("p/old.bin", listed) is False


async def test_delete_if_unchanged_keeps_a_file_rewritten_since_it_was_listed(
    backend: Backend,
) -> None:
    await put(backend, "p/kept.bin", b"first")
    listed = (await backend.list("p")).entries[0]
    await put(backend, "p/kept.bin", b"second")
    assert await backend.delete_if_unchanged("p/kept.bin", listed) is False
    assert await get(backend, "p/kept.bin") == b"second"


async def test_copy_of_an_expected_version_refuses_a_source_changed_since(
    backend: Backend,
) -> None:
    await put(backend, "c/v.bin", b"one")
    listed = (await backend.list("c")).entries[0]
    copied = await backend.copy("c/v.bin", "c/w.bin", expected=listed)
    assert (copied.size, await get(backend, "c/w.bin")) == (3, b"one")
    await put(backend, "c/v.bin", b"two!")
    with pytest.raises(ConnectionError) as caught:
        await backend.copy("c/v.bin", "c/x.bin", expected=listed)
    assert caught.value.errno == errno.EAGAIN
    assert not await backend.exists("c/x.bin")


async def test_delete_unchanged_deletes_a_batch_and_says_which(backend: Backend) -> None:
    for i in range(5):
        await put(backend, f"b/{i}", b"%d" % i)
    listed = (await backend.list("b")).entries
    deleted = await backend.delete_unchanged(listed)
    assert list(deleted) == [True] * 5
    assert await names(backend, "", recursive=True) == []


async def test_file_size_is_the_size_of_a_file_and_none_elsewhere(backend: Backend) -> None:
    await put(backend, "s/d/f.bin", b"12345")
    assert await backend.file_size("s/d/f.bin") == 5
    assert await backend.file_size("s/d") is None
    assert await backend.file_size("s/none") is None
    assert await backend.file_size("s/d/f.bin/below") is None  # a file where a folder would be
    assert await backend.file_size("s/none/f.bin") is None
