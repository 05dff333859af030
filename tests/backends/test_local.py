"""What only the local backend does: files on disk, extended attributes, temporary files,
symbolic links (never followed), descriptors, a full disk."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import gc
import hashlib
import json
import mmap
import os
import stat
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

import backends.local as local_module
from backends import _uring
from backends.base import SYSTEM_PREFIX
from backends.local import LOCK_NAME, RESTARTED_SUFFIX, SPARE_SUFFIX, TMP_DIR, XATTR, LocalBackend
from tests.backends.helpers import UploadFailed, body, failing_body, get, names, put, started
from tests.support.tmpfs import mounted_tmpfs

MiB = 1024 * 1024


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    async with started(LocalBackend(tmp_path / "store", journal=False)) as backend:
        yield backend


def base(store: LocalBackend) -> Path:
    return Path(store.base_path)


def temp_files(store: LocalBackend) -> list[str]:
    """Every temporary file of every process under the base (lock files and spares aside)."""
    root = base(store) / TMP_DIR
    return [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name != LOCK_NAME and not p.name.endswith(SPARE_SUFFIX)
    ]


def open_fds() -> int:
    """This process's open descriptors, once earlier tests' backends are collected (each
    closes its base directory's descriptor when it goes)."""
    gc.collect()
    count: int = psutil.Process().num_fds()
    return count


def spare_files(store: LocalBackend) -> list[Path]:
    """The files of replaced objects kept for later writes (``_Spares``)."""
    return sorted((base(store) / TMP_DIR).rglob(f"*{SPARE_SUFFIX}"))


# -- layout on disk ----------------------------------------------------------------------------


async def test_objects_are_plain_files_under_the_base_path(store: LocalBackend) -> None:
    await put(store, "tenants/acme/a/b.csv", b"x,y\n1,2\n")
    path = base(store) / "tenants/acme/a/b.csv"
    assert path.is_file()
    assert path.read_bytes() == b"x,y\n1,2\n"
    assert os.listdir(path.parent) == ["b.csv"]  # nothing beside it: metadata is in the file


async def test_metadata_is_one_extended_attribute_of_the_file(store: LocalBackend) -> None:
    await put(store, "t/f.json", b"{}", content_type="application/json", metadata={"k": "vé ☃"})
    raw = os.getxattr(base(store) / "t/f.json", XATTR)
    assert json.loads(raw) == {"content_type": "application/json", "metadata": {"k": "vé ☃"}}
    assert b" " not in raw.replace("vé ☃".encode(), b"")  # compact


async def test_file_without_attribute_has_no_content_type_or_metadata(
    store: LocalBackend,
) -> None:
    (base(store) / "placed").mkdir()
    (base(store) / "placed/by-hand.txt").write_bytes(b"hand")
    (base(store) / "placed/garbage.txt").write_bytes(b"junk")
    os.setxattr(base(store) / "placed/garbage.txt", XATTR, b"not json")
    for key in ("placed/by-hand.txt", "placed/garbage.txt"):
        info = await store.info(key)
        assert info.content_type is None
        assert dict(info.metadata) == {}
    assert await get(store, "placed/by-hand.txt") == b"hand"


async def test_etag_comes_from_inode_mtime_and_size(store: LocalBackend) -> None:
    info = await put(store, "e/file", b"12345")
    st = os.stat(base(store) / "e/file")
    assert info.etag == f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"
    assert info.mtime == st.st_mtime


async def test_reader_exposes_its_open_descriptor(store: LocalBackend) -> None:
    data = b"c" * (local_module.WHOLE_READ_MAX + 1)
    await put(store, "r/file", data)
    reader = await store.open_read("r/file")
    try:
        fd = reader.fileno()
        assert fd is not None
        assert os.fstat(fd).st_ino == os.stat(base(store) / "r/file").st_ino
        assert os.pread(fd, len(data), 0) == data
    finally:
        await reader.close()
    with pytest.raises(ValueError):
        reader.fileno()


async def test_a_small_file_is_read_whole_when_opened(store: LocalBackend) -> None:
    await put(store, "r/small", b"content")
    before = open_fds()
    reader = await store.open_read("r/small")
    assert reader.fileno() is None  # nothing left open: the bytes came with the opening
    assert open_fds() == before
    (base(store) / "r/small").unlink()
    assert b"".join([c async for c in reader.chunks()]) == b"content"
    assert b"".join([c async for c in reader.chunks(2, 5)]) == b"nte"
    await reader.close()


def _cached_pages(fd: int, size: int) -> int:
    """How many pages of the file ``fd`` are in the page cache (mincore(2) of a mapping
    never touched: no page is read in to answer)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    with mmap.mmap(fd, size, access=mmap.ACCESS_COPY) as mapping:
        # (the ctypes view is dropped at once: the mapping can close)
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        vector = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
        assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
        return sum(byte & 1 for byte in vector.raw)


def _thread_reads(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record each ``open_read`` that went to a worker thread."""
    calls: list[bool] = []
    to_thread = asyncio.to_thread

    async def spy(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if getattr(func, "__name__", "") == "_open_read":
            calls.append(True)
        return await to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    return calls


async def test_a_cached_small_file_is_read_on_the_event_loop(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put(store, "tenants/acme/hot.txt", b"hot" * 100)
    await get(store, "tenants/acme/hot.txt")  # in the page cache now
    threads = _thread_reads(monkeypatch)
    assert await get(store, "tenants/acme/hot.txt") == b"hot" * 100
    assert (await store.info("tenants/acme/hot.txt")).size == 300
    assert threads == []


def _nowait_answers(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record the kernel's answer to each read of a whole small file from the page cache only
    (True: served from the cache; False: it would have waited for the disk)."""
    answers: list[bool] = []
    read_whole = local_module._read_whole

    def spy(fd: int, size: int, nowait: bool) -> bytes:
        if not nowait:
            return read_whole(fd, size, nowait)
        try:
            data = read_whole(fd, size, nowait)
        except local_module._WouldBlock:
            answers.append(False)
            raise
        answers.append(True)
        return data

    monkeypatch.setattr(local_module, "_read_whole", spy)
    return answers


async def _evict(path: Path, size: int) -> None:
    """Drop a file's pages from the page cache, and see that none is left there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(100):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped
            if _cached_pages(fd, size) == 0:
                return
            # A page still in another processor's batch of pages to file is skipped: again.
            await asyncio.sleep(0.01)
        pytest.fail("the file's pages stayed in the page cache")
    finally:
        os.close(fd)


async def test_a_small_file_not_in_the_page_cache_is_read_where_the_kernel_says(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read with RWF_NOWAIT of pages not in the cache starts their readahead before it gives
    # up; where the virtual disk answers at once (CI's machine did, five cold reads in a row),
    # the kernel finds them there and serves the read without waiting. So the kernel's answer
    # decides, on a real disk: the event loop when it served the read, a thread when it would
    # have waited; and every read returns the bytes.
    data = os.urandom(48 * 1024)
    await put(store, "tenants/acme/cold.bin", data)
    threads = _thread_reads(monkeypatch)
    answers = _nowait_answers(monkeypatch)
    for _ in range(3):
        await _evict(base(store) / "tenants/acme/cold.bin", len(data))
        assert await get(store, "tenants/acme/cold.bin") == data
    assert len(answers) == 3
    assert threads == [True] * answers.count(False)


async def test_a_small_read_that_would_wait_for_the_disk_goes_to_a_thread(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(48 * 1024)
    await put(store, "tenants/acme/cold.bin", data)
    await _evict(base(store) / "tenants/acme/cold.bin", len(data))
    threads = _thread_reads(monkeypatch)
    answers = _nowait_answers(monkeypatch)
    preadv = os.preadv

    def cold(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT:  # what the kernel answers when the pages are on the disk
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", cold)
    assert await get(store, "tenants/acme/cold.bin") == data
    assert (answers, threads) == ([False], [True])


async def test_reads_go_to_threads_on_a_file_system_that_is_not_a_local_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_module, "_file_system_type", lambda fd: "nfs4")
    backend = LocalBackend(tmp_path / "nfs")
    await backend.start()
    try:
        await put(backend, "k", b"remote")
        threads = _thread_reads(monkeypatch)
        assert await get(backend, "k") == b"remote"
        assert threads == [True]
    finally:
        await backend.close()


def _spy_trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions the event loop hands to worker threads, in order."""
    trips: list[str] = []
    loop = asyncio.get_running_loop()
    run_in_executor = loop.run_in_executor

    def spy(executor: Any, func: Callable[..., Any], *args: Any) -> Any:
        # asyncio.to_thread hands over partial(context.run, function, ...): name the function
        called = func.args[0] if isinstance(func, functools.partial) and func.args else func
        trips.append(getattr(called, "__name__", repr(called)))
        return run_in_executor(executor, func, *args)

    monkeypatch.setattr(loop, "run_in_executor", spy)
    return trips


@pytest.fixture
async def threads(store: LocalBackend) -> None:
    """The backend without its io_uring ring: small writes by worker threads (as where
    io_uring is missing, refused, or turned off): no journal either."""
    if store._journal is not None:
        await store._journal.close()
        store._journal = None
    if store._ring is not None:
        await store._ring.close()
        store._ring = None


@pytest.fixture
def held_ring(store: LocalBackend) -> _HeldRing:
    if store._ring is None:  # the test folder is on tmpfs: no spares, so no ring by default
        store._ring = _uring.open_ring()
    assert store._ring is not None, "io_uring is available on this project's machines"
    return _HeldRing(store)


@pytest.mark.usefixtures("threads")
async def test_a_small_write_makes_one_trip_to_a_worker_thread(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checks run on the event loop; the thread makes the file, fsyncs and renames it.
    trips = _spy_trips(monkeypatch)
    await put(store, "tenants/acme/new/dir/k", b"first")  # its directories are made too
    await put(store, "tenants/acme/new/dir/k", b"second")
    assert trips == ["_write_whole", "_write_whole"]
    assert await get(store, "tenants/acme/new/dir/k") == b"second"
    assert temp_files(store) == []


async def test_a_small_new_write_makes_no_trip_to_a_worker_thread_on_the_ring(
    store: LocalBackend, held_ring: _HeldRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ring makes the file, writes, seals and fsyncs it; the event loop renames it.
    trips = _spy_trips(monkeypatch)
    await put(store, "tenants/acme/new/dir/k", b"first", content_type="text/plain")
    assert trips == ["_install_or_discard"]  # its directories are made by a thread
    await put(store, "tenants/acme/new/dir/k", b"second")  # no spare ready (1 s)
    assert trips == ["_install_or_discard"]
    openat, write, xattr, fsync = (
        _uring.OP_OPENAT, _uring.OP_WRITE, _uring.OP_FSETXATTR, _uring.OP_FSYNC,
    )  # fmt: skip
    assert held_ring.chains == [[openat], [write, xattr, fsync], [openat], [write, fsync], [fsync]]
    assert await get(store, "tenants/acme/new/dir/k") == b"second"
    assert (await store.info("tenants/acme/new/dir/k")).content_type is None
    assert temp_files(store) == []


async def test_a_small_write_on_the_ring_lands_when_its_directory_goes_meanwhile(
    store: LocalBackend, held_ring: _HeldRing
) -> None:
    # The key's directory is looked up once the body is sealed: one removed meanwhile is
    # made again, one moved away does not take the object along.
    await put(store, "tenants/acme/d/old", b"old")
    await store.delete("tenants/acme/d/old")
    await put(store, "tenants/acme/a/b/seed", b"s")
    held_ring.hold = {_uring.OP_WRITE}
    held_ring.release.clear()
    before = len(held_ring.chains)  # the setup's writes went through the ring too
    removed = asyncio.create_task(put(store, "tenants/acme/d/k", b"kept"))
    moved = asyncio.create_task(put(store, "tenants/acme/a/b/x", b"hello"))
    for _ in range(500):
        if held_ring.chains[before:].count([_uring.OP_WRITE, _uring.OP_FSYNC]) == 2:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError(f"the two bodies never reached the ring: {held_ring.chains}")
    os.rmdir(base(store) / "tenants/acme/d")
    store._move("tenants/acme/a/b", "tenants/acme/c/b")
    held_ring.release.set()
    await asyncio.gather(removed, moved)
    assert await get(store, "tenants/acme/d/k") == b"kept"
    assert await get(store, "tenants/acme/a/b/x") == b"hello"
    assert await names(store, "tenants/acme/c/b") == ["tenants/acme/c/b/seed"]
    assert temp_files(store) == []


async def test_a_write_cancelled_while_the_ring_opens_its_file_leaves_none(
    store: LocalBackend, held_ring: _HeldRing
) -> None:
    held_ring.hold = {_uring.OP_OPENAT}
    held_ring.release.clear()
    fds = open_fds()
    task = asyncio.create_task(store.write("c/file", body(b"d" * 4)))
    await asyncio.wait_for(held_ring.submitted.wait(), 5)
    await asyncio.gather(*held_ring.real)  # the file is made: the write is cancelled now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert temp_files(store) != []  # still open in the chain the task no longer awaits
    held_ring.release.set()
    for _ in range(200):
        if not temp_files(store) and open_fds() == fds:
            break
        await asyncio.sleep(0.01)
    assert temp_files(store) == []
    assert open_fds() == fds
    assert not await store.exists("c/file")


@pytest.mark.usefixtures("threads")
async def test_a_small_write_lands_when_its_directory_is_removed_meanwhile(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The directory is opened on the event loop, the rename happens later in a thread: an
    # empty directory removed in between (a delete of the prefix) is made again.
    await put(store, "tenants/acme/d/old", b"old")
    await store.delete("tenants/acme/d/old")
    seal = local_module._TempFile.seal

    def seal_then_remove(temp: Any, xattr: bytes | None) -> None:
        seal(temp, xattr)
        os.rmdir(base(store) / "tenants/acme/d")

    monkeypatch.setattr(local_module._TempFile, "seal", seal_then_remove)
    await put(store, "tenants/acme/d/k", b"kept")
    monkeypatch.undo()
    assert await get(store, "tenants/acme/d/k") == b"kept"
    assert temp_files(store) == []


@pytest.mark.usefixtures("threads")
async def test_a_small_write_lands_at_its_key_when_its_directory_moves_meanwhile(
    store: LocalBackend,
) -> None:
    # The checks run on the event loop, the rename later in a thread: a directory moved in
    # between must not take the acknowledged object to its new place.
    await put(store, "tenants/acme/a/b/seed", b"s")
    gate = threading.Event()
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(1)
    loop.set_default_executor(executor)
    try:
        busy = loop.run_in_executor(None, gate.wait, 5)  # the write's thread trip waits
        write = asyncio.create_task(put(store, "tenants/acme/a/b/x", b"hello"))
        await asyncio.sleep(0.05)  # the checks are done, the trip is queued behind ``busy``
        store._move("tenants/acme/a/b", "tenants/acme/c/b")  # what a move's thread does
        gate.set()
        await busy
        await write
    finally:
        gate.set()
        executor.shutdown(wait=True)
        loop.set_default_executor(ThreadPoolExecutor())
    assert await get(store, "tenants/acme/a/b/x") == b"hello"
    assert await names(store, "tenants/acme/c/b") == ["tenants/acme/c/b/seed"]


async def test_small_files_in_memory_are_read_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tmpfs refuses RWF_NOWAIT (EOPNOTSUPP): a backend that asked for it on every read would
    # open each small file twice, once on the loop and again in a thread.
    with mounted_tmpfs(tmp_path / "memory", "4m") as folder:
        backend = LocalBackend(folder)
        await backend.start()
        try:
            await put(backend, "tenants/acme/k", b"in memory")
            threads = _thread_reads(monkeypatch)
            assert await get(backend, "tenants/acme/k") == b"in memory"
            assert threads == []
        finally:
            await backend.close()


@pytest.mark.parametrize("memory", [False, True], ids=["disk", "tmpfs"])
def test_the_nowait_probe_tells_what_the_file_system_does(memory: bool, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        folder = tmp_path / "disk"
        if memory:
            folder = stack.enter_context(mounted_tmpfs(tmp_path / "memory", "1m"))
        folder.mkdir(exist_ok=True)
        _check_nowait_probe(folder)


def _check_nowait_probe(folder: Path) -> None:
    path = folder / "written"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        honoured = os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT) == 1  # a cached byte
    except OSError as exc:
        assert exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL)
        honoured = False
    finally:
        os.close(fd)
        path.unlink()
    directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert local_module._honours_nowait(directory) is honoured
        assert os.listdir(folder) == []  # the probe's file is gone
    finally:
        os.close(directory)


def test_the_file_system_type_comes_from_the_mount_table(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        found = local_module._file_system_type(fd)
    finally:
        os.close(fd)
    with open("/proc/self/mountinfo") as mounts:
        types = {line.split(" - ")[1].split()[0] for line in mounts if " - " in line}
    assert found in types


async def test_reader_keeps_its_file_when_the_path_becomes_a_link(store: LocalBackend) -> None:
    await put(store, "r/file", b"original")
    await put(store, "other/file", b"other")
    async with await store.open_read("r/file") as reader:
        os.unlink(base(store) / "r/file")
        os.symlink(base(store) / "other/file", base(store) / "r/file")
        assert b"".join([c async for c in reader.chunks()]) == b"original"


# -- temporary files ---------------------------------------------------------------------------


async def test_start_removes_leftover_temporary_files(tmp_path: Path) -> None:
    tmp = tmp_path / "store" / TMP_DIR
    (tmp / "crashed-dir").mkdir(parents=True)
    (tmp / "crashed.tmp").write_bytes(b"half an upload")
    (tmp / "crashed-dir/inner.tmp").write_bytes(b"more")
    (tmp_path / "store/kept.txt").write_bytes(b"an object")
    backend = LocalBackend(tmp_path / "store")
    await backend.start()
    try:
        (own,) = os.listdir(tmp)  # only this process's own folder, holding its lock
        assert os.listdir(tmp / own) == [LOCK_NAME]
        assert await get(backend, "kept.txt") == b"an object"
    finally:
        await backend.close()
    assert os.listdir(tmp) == []  # close removes the folder


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


async def test_start_removes_what_a_dead_process_of_this_boot_left(tmp_path: Path) -> None:
    first = LocalBackend(tmp_path / "store")
    await first.start()
    (folder,) = os.listdir(tmp_path / "store" / TMP_DIR)
    assert (tmp_path / "store" / TMP_DIR / folder / LOCK_NAME).read_text() == _boot_id()
    (tmp_path / "store" / TMP_DIR / folder / "uploading.tmp").write_bytes(b"cut short")
    lock, first._tmp_lock = first._tmp_lock, None
    assert lock is not None
    os.close(lock)  # its lock goes, as when the process dies; its folder stays
    second = LocalBackend(tmp_path / "store")
    await second.start()
    try:
        assert folder not in os.listdir(tmp_path / "store" / TMP_DIR)
        assert not any(
            name.endswith(RESTARTED_SUFFIX) for name in os.listdir(tmp_path / "store" / TMP_DIR)
        )
    finally:
        await second.close()
        await first.close()


@pytest.mark.parametrize("lock", ["an-older-boot", "", None], ids=["older", "empty", "none"])
async def test_start_keeps_what_a_process_of_an_older_boot_left(
    tmp_path: Path, lock: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    # After a power loss, a name in a temporary folder may still name the object at a key
    # (only the key's directory was flushed), with a link count of one until fsck runs:
    # removing it would free the object's blocks. Such folders are kept, renamed, and said.
    # (None: a folder written by a version that left the lock file empty.)
    tmp = tmp_path / "store" / TMP_DIR
    (tmp / "0123456789abcdef").mkdir(parents=True)
    (tmp / "0123456789abcdef" / LOCK_NAME).write_text("" if lock is None else lock)
    (tmp / "0123456789abcdef" / "f.spare").write_bytes(b"maybe the object at a key")
    backend = LocalBackend(tmp_path / "store")
    with caplog.at_level("WARNING", logger="backends.local"):
        await backend.start()
    try:
        kept = tmp / f"0123456789abcdef{RESTARTED_SUFFIX}"
        assert (kept / "f.spare").read_bytes() == b"maybe the object at a key"
        assert "before the machine restarted" in caplog.text
        await backend.close()
        await backend.start()  # and on every later start, still kept
        assert (kept / "f.spare").exists()
    finally:
        await backend.close()
    assert os.listdir(tmp) == [kept.name]


async def test_start_keeps_the_temporary_files_of_a_running_process(tmp_path: Path) -> None:
    first = LocalBackend(tmp_path / "store")
    await first.start()
    (own,) = os.listdir(tmp_path / "store" / TMP_DIR)
    (tmp_path / "store" / TMP_DIR / own / "uploading.tmp").write_bytes(b"in flight")
    second = LocalBackend(tmp_path / "store")
    await second.start()  # another replica (or --workers) over the same base path
    try:
        assert (tmp_path / "store" / TMP_DIR / own / "uploading.tmp").read_bytes() == b"in flight"
        await put(second, "k", b"written by the second")
        assert await get(first, "k") == b"written by the second"
    finally:
        await second.close()
        await first.close()


async def test_start_creates_the_base_path(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "new" / "store")
    await backend.start()
    assert (tmp_path / "new/store" / TMP_DIR).is_dir()
    assert (await backend.info("")).is_dir


async def test_start_refuses_a_base_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ValueError, match=r"storage\.local\.base-path"):
        await LocalBackend(tmp_path / "file").start()


async def test_start_refuses_a_file_system_without_extended_attributes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", unsupported)
    with pytest.raises(ValueError, match=r"storage\.local\.base-path: .*extended attributes") as e:
        await LocalBackend(tmp_path / "store").start()
    assert str(tmp_path / "store") in str(e.value)
    assert os.listdir(tmp_path / "store" / TMP_DIR) == []  # the probe and its folder are gone


async def test_failed_write_leaves_no_temporary_file(store: LocalBackend) -> None:
    await put(store, "f/file", b"old")
    with pytest.raises(UploadFailed):
        await store.write("f/file", failing_body(b"x" * (3 * MiB)))
    with pytest.raises(UploadFailed):
        await store.write("f/new", failing_body(b"y"))
    assert temp_files(store) == []
    assert await get(store, "f/file") == b"old"
    assert os.listdir(base(store) / "f") == ["file"]


async def test_cancelled_write_leaves_no_temporary_file_and_keeps_old(
    store: LocalBackend,
) -> None:
    await put(store, "c/file", b"old")
    started = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"z" * (2 * MiB)
        started.set()
        await asyncio.Event().wait()  # the client stops sending
        yield b"never"

    task = asyncio.create_task(store.write("c/file", stalled()))
    await started.wait()
    assert len(temp_files(store)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert temp_files(store) == []
    assert await get(store, "c/file") == b"old"


@pytest.mark.parametrize(
    "size",
    [4, local_module.SMALL_WRITE_MAX + 1, local_module.CHUNK_SIZE + 1],
    ids=["small", "whole", "streamed"],
)
@pytest.mark.usefixtures("threads")
async def test_write_cancelled_while_opening_its_temporary_file_leaves_none(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    entered, release, opened = threading.Event(), threading.Event(), threading.Event()
    real_open = local_module._open_temp

    def slow_open(*args: Any) -> Any:
        entered.set()
        release.wait(5)
        try:
            return real_open(*args)
        finally:
            opened.set()

    monkeypatch.setattr(local_module, "_open_temp", slow_open)
    fds = open_fds()
    task = asyncio.create_task(store.write("c/file", body(b"d" * size)))
    assert await asyncio.to_thread(entered.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await asyncio.to_thread(opened.wait, 5)
    for _ in range(200):  # the thread has opened the file: it is discarded soon after
        if not temp_files(store) and open_fds() == fds:
            break
        await asyncio.sleep(0.01)
    assert temp_files(store) == []
    assert open_fds() == fds
    assert not await store.exists("c/file")


async def test_temporary_files_never_show_in_listings(store: LocalBackend) -> None:
    await put(store, "a/kept", b"k")
    await put(store, f"{SYSTEM_PREFIX}/system.json", b"{}")
    release = asyncio.Event()

    first = b"p" * local_module.CHUNK_SIZE  # a body this long streams through a temporary file

    async def paused() -> AsyncIterator[bytes]:
        yield first
        await release.wait()

    task = asyncio.create_task(store.write("a/pending", paused()))
    while not temp_files(store):
        await asyncio.sleep(0.01)
    try:
        assert await names(store, "", recursive=True) == [".gateway/system.json", "a/kept"]
        assert await names(store, ".gateway") == [".gateway/system.json"]
        assert await names(store, ".gateway", recursive=True) == [".gateway/system.json"]
    finally:
        release.set()
        await task
    assert await get(store, "a/pending") == first


async def test_keys_inside_the_temporary_directory_are_refused(store: LocalBackend) -> None:
    (base(store) / TMP_DIR / "someone.tmp").write_bytes(b"")
    with pytest.raises(PermissionError):
        await store.info(f"{TMP_DIR}/someone.tmp")
    with pytest.raises(PermissionError):
        await store.list(TMP_DIR)
    with pytest.raises(PermissionError):
        await put(store, f"{TMP_DIR}/mine.tmp")
    with pytest.raises(PermissionError):
        await store.delete(f"{TMP_DIR}/someone.tmp")
    with pytest.raises(PermissionError):
        await store.move(SYSTEM_PREFIX, "elsewhere")
    assert temp_files(store) == ["someone.tmp"]


async def test_delete_prefix_of_the_system_prefix_keeps_the_temporary_directory(
    store: LocalBackend,
) -> None:
    await put(store, ".gateway/iam/users.json", b"[]")
    assert await store.delete_prefix(".gateway") == 1
    assert (base(store) / TMP_DIR).is_dir()
    await put(store, "still/works", b"ok")


@pytest.mark.parametrize(
    "key",
    ["../escape.txt", "a/../../escape.txt", "a//b", "/escape.txt", "a/./b", "a/", "a\0b", ""],
)
async def test_malformed_keys_are_refused_and_touch_nothing(
    store: LocalBackend, tmp_path: Path, key: str
) -> None:
    with pytest.raises(ValueError):
        await put(store, key, b"escaped")
    with pytest.raises(ValueError):
        await store.mkdir(key)
    if key:
        with pytest.raises(ValueError):
            await store.info(key)
    assert not (tmp_path / "escape.txt").exists()
    assert sorted(os.listdir(base(store))) == [".gateway"]


async def test_small_chunks_are_buffered_into_few_disk_writes(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_writev = os.writev

    def counting_writev(fd: int, buffers: list[memoryview]) -> int:
        written = real_writev(fd, buffers)
        calls.append(written)
        return written

    monkeypatch.setattr(os, "writev", counting_writev)
    chunk = bytes(range(256)) * 16  # 4 KiB
    await store.write("b/buffered", body(*[chunk] * 1024))  # 4 MiB
    monkeypatch.undo()
    assert sum(calls) == 4 * MiB
    assert len(calls) <= 5
    assert await get(store, "b/buffered") == chunk * 1024


async def test_readers_see_whole_versions_during_overwrites(store: LocalBackend) -> None:
    size = 3 * MiB // 2  # more than one read piece
    await put(store, "v/hot", b"\0" * size)
    done = False

    async def overwrite() -> None:
        for version in range(1, 12):
            await store.write(
                "v/hot", body(bytes([version]) * (size // 2), bytes([version]) * (size - size // 2))
            )
            await asyncio.sleep(0)

    async def read() -> set[int]:
        seen = set()
        while not done:
            data = await get(store, "v/hot")
            assert len(data) == size
            assert data == data[:1] * size, "a reader saw parts of two versions"
            seen.add(data[0])
        return seen

    readers = [asyncio.create_task(read()) for _ in range(3)]
    await overwrite()
    done = True
    seen = set().union(*await asyncio.gather(*readers))
    assert seen  # the readers did read
    assert await get(store, "v/hot") == bytes([11]) * size


# -- lookups: one openat2 call, or a walk where it is missing -------------------------------------


@pytest.mark.parametrize("one_call", [True, False], ids=["openat2", "walk"])
async def test_lookups_refuse_links_anywhere_on_the_way(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch, one_call: bool
) -> None:
    if one_call:
        assert local_module._openat2 is not None  # Linux 5.6 or later
    else:
        monkeypatch.setattr(local_module, "_openat2", None)
    await put(store, "t/a/b/obj", b"x")
    await put(store, "t/file", b"f")
    os.symlink(base(store) / "t/a", base(store) / "t/link")  # a link as a directory, ...
    os.symlink("b", base(store) / "t/a/lb")  # ... relative, deeper, ...
    os.symlink("b", base(store) / "t/a/last")  # ... and as the key's own directory
    for key in ("t/link/b/obj", "t/a/lb/obj", "t/a/last/obj"):
        with pytest.raises(PermissionError):
            await store.info(key)
        with pytest.raises(PermissionError):
            await put(store, key, b"y")
        with pytest.raises(PermissionError):
            await store.list(key.rsplit("/", 1)[0])
    with pytest.raises(FileNotFoundError):
        await store.info("t/file/x")  # a file on the way
    with pytest.raises(FileNotFoundError):
        await store.info("t/missing/x")
    assert await store.file_size("t/missing/x") is None
    assert await store.file_size("t/a/b/obj") == 1
    assert await get(store, "t/a/b/obj") == b"x"
    assert (base(store) / "t/a/b/obj").read_bytes() == b"x"


def test_a_one_call_lookup_never_leaves_the_base(tmp_path: Path) -> None:
    (tmp_path / "base/a").mkdir(parents=True)
    fd = os.open(tmp_path / "base", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(PermissionError):
            local_module._open_beneath(fd, ["a", "..", ".."], "a/../..")
        inner = local_module._open_beneath(fd, ["a"], "a")
        assert inner is not None
        assert os.readlink(f"/proc/self/fd/{inner}") == str(tmp_path / "base/a")
        os.close(inner)
    finally:
        os.close(fd)


# -- spares: replaced small files become later writes' files -------------------------------------


@pytest.fixture(params=["ring", "threads"])
async def spares(
    request: pytest.FixtureRequest, store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[local_module._Spares]:
    """The backend's spares, on whatever file system the test folder is, reusable at once;
    small writes over them made by io_uring ("ring"), or by worker threads ("threads", as
    where io_uring is missing or refused)."""
    monkeypatch.setattr(local_module, "SPARE_MIN_AGE", 0.0)
    store._spares = local_module._Spares()
    if store._ring is not None:
        await store._ring.close()
        store._ring = None
    if request.param == "ring":
        store._ring = _uring.open_ring()
        assert store._ring is not None, "io_uring is available on this project's machines"
        # Spares are reused at once here, not a second later: let the ring take them too.
        monkeypatch.setattr(local_module, "_MTIME_MARGIN_NS", 0)
    yield store._spares


def on_ring(store: LocalBackend) -> bool:
    return store._ring is not None


class _HeldRing:
    """Wraps a backend's ring: every chain is submitted at once, and its results are held
    (or replaced) until the test says; records what was submitted."""

    def __init__(self, store: LocalBackend) -> None:
        assert store._ring is not None
        self.ring = store._ring
        self.chains: list[list[int]] = []  # the opcodes of each chain submitted
        self.submitted = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.hook: Callable[[list[_uring.Op], list[int]], list[int]] | None = None
        self.hold: set[int] | None = None  # hold only chains that begin with these operations
        self.real: list[asyncio.Future[list[int]]] = []  # the ring's own futures
        run = self.ring.run

        def held(ops: list[_uring.Op]) -> asyncio.Future[list[int]]:
            self.chains.append([op.opcode for op in ops])
            done = run(ops)
            self.real.append(done)

            async def later() -> list[int]:
                results = await done
                if self.hold is None or ops[0].opcode in self.hold:
                    await self.release.wait()
                return self.hook(ops, results) if self.hook is not None else results

            self.submitted.set()
            return asyncio.ensure_future(later())

        self.ring.run = held  # type: ignore[method-assign]


async def test_a_replaced_small_file_becomes_the_next_writes_file(
    store: LocalBackend, spares: local_module._Spares
) -> None:
    await put(store, "s/a", b"x" * 10_000, content_type="text/csv", metadata={"owner": "ann"})
    first = await store.info("s/a")
    inode = os.stat(base(store) / "s/a").st_ino
    await put(store, "s/a", b"second")  # the first file is kept, not freed
    assert [p.stat().st_ino for p in spare_files(store)] == [inode]
    await put(store, "s/b", b"third")  # written over it: its tail and attribute go
    assert os.stat(base(store) / "s/b").st_ino == inode
    assert await get(store, "s/b") == b"third"
    info = await store.info("s/b")
    assert (info.size, info.content_type, dict(info.metadata)) == (5, None, {})
    assert info.etag != first.etag
    assert await get(store, "s/a") == b"second"
    assert spare_files(store) == [] and temp_files(store) == []


async def test_a_write_over_a_spare_hands_only_its_two_fsyncs_to_threads_or_the_ring(
    store: LocalBackend, spares: local_module._Spares, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put(store, "s/a", b"first")
    await put(store, "s/a", b"second")
    trips = _spy_trips(monkeypatch)
    held = _HeldRing(store) if on_ring(store) else None
    await put(store, "s/b", b"over the spare", content_type="text/plain")
    over_spare = [] if held else ["_fill_and_seal", "_settle"]
    assert trips == over_spare
    if held:  # body, attribute and fsync in one chain; then the directory's fsync
        write, xattr, fsync = _uring.OP_WRITE, _uring.OP_FSETXATTR, _uring.OP_FSYNC
        assert held.chains == [[write, xattr, fsync], [fsync]]
    await put(store, "s/dir/k", b"x")  # no spare ready: a new file
    if held:  # made by the ring; its directory, missing, by a thread
        assert held.chains[2:] == [[_uring.OP_OPENAT], [_uring.OP_WRITE, _uring.OP_FSYNC]]
        assert trips == ["_install_or_discard"]
    else:  # the whole write in one trip
        assert trips == [*over_spare, "_write_whole"]
    assert await get(store, "s/b") == b"over the spare"
    assert (await store.info("s/b")).content_type == "text/plain"
    assert temp_files(store) == []


async def test_the_ring_leaves_a_spare_written_moments_ago_to_a_thread(
    store: LocalBackend, spares: local_module._Spares, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ring's write takes the kernel's coarse clock for the modification time, and the
    # ETag needs it later than the earlier object's: a spare that recent gets seal()'s
    # explicit time.
    monkeypatch.setattr(local_module, "_MTIME_MARGIN_NS", 60 * 10**9)
    await put(store, "s/a", b"first")
    first = await store.info("s/a")
    await put(store, "s/a", b"other")
    trips = _spy_trips(monkeypatch)
    await put(store, "s/b", b"first")  # same size, same inode
    assert trips == (["_fill_and_seal"] if on_ring(store) else ["_fill_and_seal", "_settle"])
    assert (await store.info("s/b")).etag != first.etag


async def test_a_write_over_a_spare_by_the_ring_gets_a_later_time_and_a_new_etag(
    store: LocalBackend, spares: local_module._Spares, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_module, "_MTIME_MARGIN_NS", 100_000_000)  # the real margin
    await put(store, "s/a", b"first")
    await put(store, "s/a", b"other")
    (spare,) = spare_files(store)
    earlier = spare.stat().st_mtime_ns - 2 * 10**9  # as if replaced two seconds ago
    os.utime(spare, ns=(earlier, earlier))
    old_etag = local_module._etag(spare.stat())
    inode = spare.stat().st_ino
    held = _HeldRing(store) if on_ring(store) else None
    await put(store, "s/b", b"first")  # same size, same inode
    if held:
        assert held.chains[0][0] == _uring.OP_WRITE  # by the ring
    st = os.stat(base(store) / "s/b")
    assert st.st_ino == inode
    assert st.st_mtime_ns > earlier
    assert (await store.info("s/b")).etag not in (old_etag, None)


async def test_a_write_over_a_spare_makes_a_missing_directory(
    store: LocalBackend, spares: local_module._Spares
) -> None:
    await put(store, "s/a", b"first")
    await put(store, "s/a", b"second")
    inode = spare_files(store)[0].stat().st_ino
    await put(store, "s/new/dir/k", b"in a new directory")
    assert os.stat(base(store) / "s/new/dir/k").st_ino == inode
    assert await get(store, "s/new/dir/k") == b"in a new directory"
    assert spare_files(store) == [] and temp_files(store) == []


async def test_a_cancelled_write_over_a_spare_leaves_nothing_and_keeps_the_old_object(
    store: LocalBackend, spares: local_module._Spares, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put(store, "s/b", b"old b")
    await put(store, "s/a", b"first")
    await put(store, "s/a", b"second")
    assert len(spare_files(store)) == 1
    entered, release = threading.Event(), threading.Event()
    seal = local_module._TempFile.seal

    def slow_seal(temp: Any, xattr: bytes | None) -> None:
        entered.set()
        release.wait(5)
        seal(temp, xattr)

    if on_ring(store):  # cancelled while the ring writes the spare
        held = _HeldRing(store)
        held.release.clear()
        write = asyncio.create_task(put(store, "s/b", b"never"))
        await asyncio.wait_for(held.submitted.wait(), 5)
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        # Its descriptor stays open while the chain runs (a number closed meanwhile could
        # name another file by the time the kernel looks it up): discarded after.
        assert len(spare_files(store)) == 1
        held.release.set()
    else:
        monkeypatch.setattr(local_module._TempFile, "seal", slow_seal)
        write = asyncio.create_task(put(store, "s/b", b"never"))
        assert await asyncio.to_thread(entered.wait, 5)
        write.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await write
    assert await get(store, "s/b") == b"old b"
    for _ in range(100):  # the ring's chain ends, then its file goes
        if spare_files(store) == [] and temp_files(store) == []:
            break
        await asyncio.sleep(0.01)
    assert spare_files(store) == [] and temp_files(store) == []


async def test_a_replaced_file_becomes_a_spare_only_once_the_exchange_is_durable(
    store: LocalBackend, spares: local_module._Spares, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put(store, "s/a", b"first")
    await put(store, "s/a", b"second")  # a spare: the third write goes over it
    await put(store, "s/x", b"made")
    fsync = os.fsync
    queued_at_directory_fsync: list[int] = []
    held = _HeldRing(store) if on_ring(store) else None

    def is_directory_fsync(op: _uring.Op) -> bool:
        return op.opcode == _uring.OP_FSYNC and stat.S_ISDIR(os.fstat(op.fd).st_mode)

    def watching_ring(ops: list[_uring.Op], results: list[int]) -> list[int]:
        if is_directory_fsync(ops[0]):
            queued_at_directory_fsync.append(len(spares._names))
        return results

    def watching(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            queued_at_directory_fsync.append(len(spares._names))
        fsync(fd)

    if held:
        held.hook = watching_ring
    monkeypatch.setattr(os, "fsync", watching)
    await put(store, "s/x", b"over the spare")
    assert queued_at_directory_fsync == [0]  # not yet a spare when the directory is synced
    assert len(spares._names) == 1
    # and when that fsync fails, the replaced file never becomes one

    def failing_ring(ops: list[_uring.Op], results: list[int]) -> list[int]:
        return [-errno.EIO] if is_directory_fsync(ops[0]) else results

    def failing(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "injected")
        fsync(fd)

    if held:
        held.hook = failing_ring
    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        await put(store, "s/a", b"third")  # over the spare, replacing a file
    assert spares._names == deque()
    with pytest.raises(OSError):
        await put(store, "s/b", b"b")  # a new key, no spare ready: in a thread
    with pytest.raises(OSError):
        await put(store, "s/a", b"fourth")
    assert spares._names == deque()


async def test_an_empty_object_over_an_empty_spare_gets_a_new_etag(
    store: LocalBackend, spares: local_module._Spares
) -> None:
    await put(store, "s/a", b"")
    first = await store.info("s/a")
    inode = os.stat(base(store) / "s/a").st_ino
    await put(store, "s/a", b"")
    await put(store, "s/b", b"")  # over the first file: no byte written, no tail cut
    assert os.stat(base(store) / "s/b").st_ino == inode
    again = await store.info("s/b")
    assert again.etag != first.etag
    assert again.mtime is not None and first.mtime is not None
    assert again.mtime >= first.mtime


async def test_a_full_disk_drops_the_spares(
    store: LocalBackend, spares: local_module._Spares, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_module, "SPARE_MIN_AGE", 60.0)
    for number in range(3):
        await put(store, f"s/{number}", b"v1")
        await put(store, f"s/{number}", b"v2")
    assert len(spare_files(store)) == 3

    def full(temp: Any, chunks: list[bytes], *, writeback: bool = True) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_module._TempFile, "append", full)
    if on_ring(store):  # the ring's write finds the disk full too; a thread tries again
        _HeldRing(store).hook = lambda ops, results: [
            -errno.ENOSPC if op.opcode == _uring.OP_WRITE else result
            for op, result in zip(ops, results, strict=True)
        ]
    with pytest.raises(OSError):
        await put(store, "s/new", b"x")
    assert spare_files(store) == [] and temp_files(store) == []


async def test_a_spare_open_elsewhere_is_not_written_over(
    store: LocalBackend, spares: local_module._Spares
) -> None:
    await put(store, "s/a", b"old " * 1000)
    with open(base(store) / "s/a", "rb") as reader:  # e.g. a backup reading the old version
        inode = os.fstat(reader.fileno()).st_ino
        await put(store, "s/a", b"new")
        await put(store, "s/b", b"other")
        assert os.stat(base(store) / "s/b").st_ino != inode
        assert reader.read() == b"old " * 1000
        assert [p.stat().st_ino for p in spare_files(store)] == [inode]  # its turn comes again
    await put(store, "s/c", b"later")  # closed now: written over
    assert os.stat(base(store) / "s/c").st_ino == inode
    assert [await get(store, k) for k in ("s/a", "s/b", "s/c")] == [b"new", b"other", b"later"]
    assert spare_files(store) == [] and temp_files(store) == []


async def test_a_spare_is_reused_only_once_it_has_been_out_of_every_key_a_while(
    store: LocalBackend, spares: local_module._Spares, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_module, "SPARE_MIN_AGE", 60.0)
    await put(store, "s/a", b"old")
    inode = os.stat(base(store) / "s/a").st_ino
    await put(store, "s/a", b"new")
    await put(store, "s/b", b"other")
    assert os.stat(base(store) / "s/b").st_ino != inode
    assert [p.stat().st_ino for p in spare_files(store)] == [inode]


async def test_a_hard_linked_object_is_not_kept_as_a_spare(
    store: LocalBackend, spares: local_module._Spares, tmp_path: Path
) -> None:
    await put(store, "s/a", b"linked")
    os.link(base(store) / "s/a", tmp_path / "elsewhere")
    await put(store, "s/a", b"new")
    await put(store, "s/b", b"other")
    assert (tmp_path / "elsewhere").read_bytes() == b"linked"
    assert spare_files(store) == [] and temp_files(store) == []


async def test_a_replaced_large_file_is_removed_not_kept(
    store: LocalBackend, spares: local_module._Spares
) -> None:
    await put(store, "s/big", b"b" * (local_module.SMALL_WRITE_MAX + 1))
    await put(store, "s/big", b"small now")
    assert spare_files(store) == [] and temp_files(store) == []
    assert await get(store, "s/big") == b"small now"


async def test_spares_are_bounded(
    store: LocalBackend, spares: local_module._Spares, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_module, "SPARES_MAX", 2)
    monkeypatch.setattr(local_module, "SPARE_MIN_AGE", 60.0)  # none is taken meanwhile
    for number in range(4):
        await put(store, f"s/{number}", b"v1")
    for number in range(4):
        await put(store, f"s/{number}", b"v2")
    assert len(spare_files(store)) == 2 and temp_files(store) == []
    assert [await get(store, f"s/{n}") for n in range(4)] == [b"v2"] * 4


async def test_where_leases_are_refused_replaced_files_are_removed(
    store: LocalBackend, spares: local_module._Spares, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fcntl.fcntl

    def no_leases(fd: int, command: int, *args: Any) -> Any:
        if command == fcntl.F_SETLEASE:
            raise OSError(errno.EINVAL, "leases unsupported")
        return real(fd, command, *args)

    monkeypatch.setattr(fcntl, "fcntl", no_leases)
    await put(store, "s/a", b"old")
    await put(store, "s/a", b"new")  # kept: leases are only asked for when reusing
    await put(store, "s/b", b"other")  # refused: the spare goes, and spares are off
    assert not spares.enabled
    await put(store, "s/a", b"newer")
    assert spare_files(store) == [] and temp_files(store) == []
    assert [await get(store, k) for k in ("s/a", "s/b")] == [b"newer", b"other"]


async def test_a_directory_that_took_the_keys_place_is_put_back(
    store: LocalBackend, spares: local_module._Spares
) -> None:
    await put(store, "s/d/inner", b"inner")
    tmp = store._open_dir(store._tmp_segments, TMP_DIR)
    parent = store._open_dir(["s"], "s")
    try:
        os.close(os.open("t.tmp", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=tmp))
        with pytest.raises(IsADirectoryError):
            spares.exchange(tmp, "t.tmp", parent, "d")
        assert os.path.isfile(f"/proc/self/fd/{tmp}/t.tmp")
        os.unlink("t.tmp", dir_fd=tmp)
    finally:
        os.close(tmp)
        os.close(parent)
    assert await get(store, "s/d/inner") == b"inner"


async def test_a_read_opens_again_if_its_file_was_replaced_as_it_opened_it(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file that left its key may become another write's file: only a file still at the key
    # once open is served.
    await put(store, "s/a", b"first")
    replacement = base(store) / "s/replacement"
    replacement.write_bytes(b"second")
    real = local_module._open_in
    opened: list[str] = []

    def open_then_replace(parent: int, name: str, key: str) -> Any:
        found = real(parent, name, key)
        if not opened:
            os.replace(replacement, base(store) / "s/a")  # a write lands right after the open
        opened.append(name)
        return found

    monkeypatch.setattr(local_module, "_open_in", open_then_replace)
    assert await get(store, "s/a") == b"second"
    assert (await store.info("s/a")).size == len(b"second")
    assert opened[:2] == ["a", "a"]


async def test_readers_of_small_objects_see_only_their_own_whole_versions_with_spares(
    store: LocalBackend, spares: local_module._Spares
) -> None:
    # Two keys overwritten in turn, each version one repeated byte of its own range: a reader
    # that got a reused file of the other key, or one half rewritten, would see it.
    size = 4096
    done = False

    async def overwrite() -> None:
        for version in range(60):
            for key, offset in (("v/hot", 0), ("v/cold", 100)):
                await put(store, key, bytes([offset + version % 100]) * (size + version))

    async def read(key: str, offset: int) -> int:
        count = 0
        while not done:
            with contextlib.suppress(FileNotFoundError):
                data = await get(store, key)
                assert data == data[:1] * len(data), "a reader saw parts of two versions"
                assert offset <= data[0] < offset + 100, "a reader saw another key's bytes"
                assert len(data) == size + (data[0] - offset)
                count += 1
            await asyncio.sleep(0)
        return count

    await put(store, "v/hot", bytes([0]) * size)
    await put(store, "v/cold", bytes([100]) * size)
    readers = [asyncio.create_task(read(k, o)) for k, o in [("v/hot", 0), ("v/cold", 100)] * 2]
    await overwrite()
    done = True
    assert all(await asyncio.gather(*readers))
    assert spare_files(store)  # spares were in play


async def test_move_without_renameat2_still_refuses_an_existing_destination(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_module, "_renameat2", None)
    await put(store, "m/a", b"a")
    await put(store, "m/b", b"b")
    await put(store, "m/dir/x", b"x")
    await store.mkdir("m/empty")
    with pytest.raises(FileExistsError):
        await store.move("m/a", "m/b")
    with pytest.raises(FileExistsError):
        await store.move("m/dir", "m/empty")
    with pytest.raises(FileExistsError):
        await put(store, "m/a", b"again", exclusive=True)
    await store.move("m/a", "m/c")
    await store.move("m/dir", "m/dir2")
    assert await names(store, "m", recursive=True) == ["m/b", "m/c", "m/dir2/x"]
    assert await get(store, "m/c") == b"a"


# -- the directory's fsync after a small write: one round for the renames made meanwhile ---------


def _is_directory_fsync(ops: list[_uring.Op]) -> bool:
    """Whether a chain is a round of ``_DirectorySyncs``: one fsync, of a directory."""
    return (
        len(ops) == 1
        and ops[0].opcode == _uring.OP_FSYNC
        and stat.S_ISDIR(os.fstat(ops[0].fd).st_mode)
    )


class _Rounds:
    """Counts the writes that ask for a directory fsync after their rename
    (``_DirectorySyncs.after``, ``asked``: the future each got). Over a ``_HeldRing``
    (``held``), also holds each round the ring is given (a chain of one fsync of a
    directory), once the kernel has run it, until the test ends it (``end``)."""

    def __init__(
        self, store: LocalBackend, monkeypatch: pytest.MonkeyPatch, held: _HeldRing | None = None
    ) -> None:
        self.asked: list[asyncio.Future[list[int]]] = []
        self.asked_fds: list[int] = []  # the descriptor each write passed (its directory)
        self.directories: list[int] = []  # the inode each round synced, in order
        self.fds: list[int] = []  # the descriptor each round synced, in order
        self.ran: list[asyncio.Future[list[int]]] = []  # each round's fsync, as the ring ran it
        self._ends: list[asyncio.Event] = []
        self._changed = asyncio.Event()
        after = store._dir_syncs.after

        def asking(directory: int, ring: _uring.Ring) -> asyncio.Future[list[int]]:
            future = after(directory, ring)
            self.asked.append(future)
            self.asked_fds.append(directory)
            self._changed.set()
            return future

        monkeypatch.setattr(store._dir_syncs, "after", asking)
        if held is None:
            return
        run = held.ring.run

        def holding(ops: list[_uring.Op]) -> asyncio.Future[list[int]]:
            if not _is_directory_fsync(ops):
                return run(ops)
            self.directories.append(os.fstat(ops[0].fd).st_ino)
            self.fds.append(ops[0].fd)
            end = asyncio.Event()
            self._ends.append(end)
            done = run(ops)
            self.ran.append(done)

            async def ended() -> list[int]:
                results = await done
                await end.wait()
                return results

            self._changed.set()
            return asyncio.ensure_future(ended())

        held.ring.run = holding  # type: ignore[method-assign]

    def end(self, number: int) -> None:
        """Let round ``number`` (from 0) end, once the kernel has run it."""
        self._ends[number].set()

    async def until(self, *, asked: int = 0, rounds: int = 0) -> None:
        """Wait until ``asked`` writes have asked for a round, and ``rounds`` were handed to
        the ring."""

        async def waiting() -> None:
            while len(self.asked) < asked or len(self.directories) < rounds:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(waiting(), 5)


async def test_writes_renamed_while_a_directory_fsync_runs_share_the_next_one(
    store: LocalBackend, held_ring: _HeldRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"g/{number}" for number in range(4)]
    for key in keys:
        await put(store, key, b"old")  # replaced below: small files
    directory = os.stat(base(store) / "g").st_ino
    held_ring.chains.clear()  # those of the writes above
    rounds = _Rounds(store, monkeypatch, held_ring)
    first = asyncio.create_task(put(store, keys[0], b"new 0"))
    await rounds.until(asked=1)  # renamed: its round runs (held)
    rest = [
        asyncio.create_task(put(store, key, f"new {number}".encode()))
        for number, key in enumerate(keys[1:], 1)
    ]
    await rounds.until(asked=4)  # the three others renamed meanwhile
    assert [(base(store) / key).read_bytes() for key in keys] == [
        f"new {number}".encode() for number in range(4)
    ]
    assert held_ring.chains.count([_uring.OP_FSYNC]) == 1  # none of their own
    assert rounds.directories == [directory]
    assert rounds.asked[1] is rounds.asked[2] is rounds.asked[3] is not rounds.asked[0]
    rounds.end(0)
    await asyncio.wait_for(first, 5)
    await rounds.until(rounds=2)  # the next round, started as the first ended: one for all
    await asyncio.wait_for(rounds.ran[1], 5)
    assert not any(task.done() for task in rest)  # their round is still held
    rounds.end(1)
    await asyncio.wait_for(asyncio.gather(*rest), 5)
    assert held_ring.chains.count([_uring.OP_FSYNC]) == 2
    assert rounds.directories == [directory, directory]
    # Each round on the descriptor of its first write, opened before that write's rename (a
    # writeback error is reported once per open file: one kept across rounds could miss it).
    assert rounds.fds == [rounds.asked_fds[0], rounds.asked_fds[1]]
    for number, key in enumerate(keys):
        assert await get(store, key) == f"new {number}".encode()
    assert store._dir_syncs._running == {}  # idle: its descriptor is closed
    assert temp_files(store) == []


async def test_a_write_renamed_while_a_round_runs_waits_for_the_next_round(
    store: LocalBackend, held_ring: _HeldRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rename is durable only once an fsync of its directory that began after it has ended:
    # the round running when it was made does not make it so.
    for key in ("g/a", "g/b", "g/c"):
        await put(store, key, b"old")
    held_ring.chains.clear()  # those of the writes above
    rounds = _Rounds(store, monkeypatch, held_ring)
    first = asyncio.create_task(put(store, "g/a", b"a"))
    await rounds.until(asked=1, rounds=1)
    second = asyncio.create_task(put(store, "g/b", b"b"))
    await rounds.until(asked=2)  # renamed while the first round runs
    assert (base(store) / "g/b").read_bytes() == b"b"
    rounds.end(0)
    await asyncio.wait_for(first, 5)
    await rounds.until(rounds=2)
    await asyncio.wait_for(rounds.ran[1], 5)  # the kernel has run the second round...
    assert not second.done()  # ...which the test still holds: the write waits for it
    third = asyncio.create_task(put(store, "g/c", b"c"))
    await rounds.until(asked=3)  # renamed while the second round runs
    rounds.end(1)
    await asyncio.wait_for(second, 5)
    await rounds.until(rounds=3)
    await asyncio.wait_for(rounds.ran[2], 5)
    assert not third.done()
    rounds.end(2)
    await asyncio.wait_for(third, 5)
    assert held_ring.chains.count([_uring.OP_FSYNC]) == 3
    assert [await get(store, key) for key in ("g/a", "g/b", "g/c")] == [b"a", b"b", b"c"]
    assert store._dir_syncs._running == {}


async def test_a_failed_directory_fsync_fails_every_write_of_its_round(
    store: LocalBackend, held_ring: _HeldRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"f/{number}" for number in range(4)]
    for key in keys:
        await put(store, key, b"old")
    fds = open_fds()
    seen = 0

    def failing_second_round(ops: list[_uring.Op], results: list[int]) -> list[int]:
        nonlocal seen
        if _is_directory_fsync(ops):
            seen += 1
            if seen == 2:
                return [-errno.EIO]
        return results

    held_ring.hook = failing_second_round
    held_ring.chains.clear()  # those of the writes above
    rounds = _Rounds(store, monkeypatch, held_ring)
    first = asyncio.create_task(put(store, keys[0], b"new"))
    await rounds.until(asked=1)
    shared = [asyncio.create_task(put(store, key, b"new")) for key in keys[1:]]
    await rounds.until(asked=4)
    rounds.end(0)
    await asyncio.wait_for(first, 5)  # its round succeeded
    await rounds.until(rounds=2)
    rounds.end(1)
    failures = await asyncio.wait_for(asyncio.gather(*shared, return_exceptions=True), 5)
    assert [type(failure) for failure in failures] == [OSError] * 3
    assert [getattr(failure, "errno", None) for failure in failures] == [errno.EIO] * 3
    assert store._dir_syncs._running == {}  # the directory's rounds ended with the failure
    assert open_fds() == fds
    # The next write into the directory starts rounds anew, and they succeed.
    later = asyncio.create_task(put(store, "f/later", b"later"))
    await rounds.until(asked=5, rounds=3)
    rounds.end(2)
    await asyncio.wait_for(later, 5)
    assert held_ring.chains.count([_uring.OP_FSYNC]) == 3
    assert await get(store, "f/later") == b"later"
    assert store._dir_syncs._running == {}
    assert open_fds() == fds


async def test_writes_into_two_directories_do_not_wait_for_each_others_rounds(
    store: LocalBackend, held_ring: _HeldRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put(store, "d1/k", b"old")
    await put(store, "d2/k", b"old")
    d1, d2 = (os.stat(base(store) / name).st_ino for name in ("d1", "d2"))
    held_ring.chains.clear()  # those of the writes above
    rounds = _Rounds(store, monkeypatch, held_ring)
    one = asyncio.create_task(put(store, "d1/k", b"one"))
    await rounds.until(asked=1, rounds=1)  # d1's round runs (held)
    two = asyncio.create_task(put(store, "d2/k", b"two"))
    await rounds.until(asked=2, rounds=2)  # d2's started at once, beside it
    assert rounds.directories == [d1, d2]
    assert len(store._dir_syncs._running) == 2
    rounds.end(1)
    await asyncio.wait_for(two, 5)  # done while d1's round is still held
    assert not one.done()
    rounds.end(0)
    await asyncio.wait_for(one, 5)
    assert held_ring.chains.count([_uring.OP_FSYNC]) == 2
    assert [await get(store, key) for key in ("d1/k", "d2/k")] == [b"one", b"two"]
    assert store._dir_syncs._running == {}


async def test_a_small_write_lands_when_its_directory_is_removed_after_the_checks(
    store: LocalBackend, spares: local_module._Spares, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The key's directory is looked up again right before the rename: one removed since the
    # checks (a delete of the prefix) is made anew, by a thread.
    await put(store, "gone/old", b"old")
    await store.delete("gone/old")  # "gone" stays, empty
    await put(store, "s/a", b"first")
    await put(store, "s/a", b"second")
    (spare,) = spare_files(store)
    inode = spare.stat().st_ino
    take = store._take_spare
    removed: list[bool] = []

    def take_then_remove() -> local_module._TempFile | None:
        temp = take()  # after the checks, which found "gone"
        os.rmdir(base(store) / "gone")
        removed.append(temp is not None)
        return temp

    monkeypatch.setattr(store, "_take_spare", take_then_remove)
    trips = _spy_trips(monkeypatch)
    await asyncio.wait_for(put(store, "gone/k", b"kept"), 5)
    assert removed == [True]  # over the spare, on the small path
    seal = [] if on_ring(store) else ["_fill_and_seal"]
    assert trips == [*seal, "_install_or_discard"]
    assert os.stat(base(store) / "gone/k").st_ino == inode
    assert await get(store, "gone/k") == b"kept"
    assert await names(store, "gone") == ["gone/k"]
    assert temp_files(store) == [] and spare_files(store) == []
    assert store._dir_syncs._running == {}


async def test_a_small_write_lands_at_its_key_when_its_directory_moves_after_the_checks(
    store: LocalBackend, spares: local_module._Spares, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The directory the checks found is not the one the rename goes to: it is looked up
    # again right before it, and one moved in between does not take the object with it.
    await put(store, "a/b/seed", b"s")
    await put(store, "s/a", b"first")
    await put(store, "s/a", b"second")  # a spare: the write below takes the small path
    take = store._take_spare
    taken: list[bool] = []

    def take_then_move() -> local_module._TempFile | None:
        temp = take()  # after the checks, which found "a/b"
        store._move("a/b", "c/b")  # what a move's thread does
        taken.append(temp is not None)
        return temp

    monkeypatch.setattr(store, "_take_spare", take_then_move)
    await asyncio.wait_for(put(store, "a/b/x", b"hello"), 5)
    assert taken == [True]  # over the spare, on the small path
    assert await names(store, "c/b") == ["c/b/seed"]
    assert await get(store, "a/b/x") == b"hello"
    assert temp_files(store) == [] and spare_files(store) == []


@pytest.mark.parametrize("spares", ["ring"], indirect=True)
async def test_a_write_that_cannot_join_a_round_settles_in_a_thread(
    store: LocalBackend, spares: local_module._Spares, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put(store, "s/a", b"v1")
    await put(store, "s/a", b"v2")  # a spare: the next write takes the ring's path
    fds = open_fds()

    def failing(directory: int, ring: _uring.Ring) -> asyncio.Future[list[int]]:
        raise OSError(errno.EMFILE, "too many open files")

    monkeypatch.setattr(store._dir_syncs, "after", failing)
    trips = _spy_trips(monkeypatch)
    await put(store, "s/b", b"v3")
    assert trips == ["_settle"]  # the directory's fsync (and the rest) in a thread
    assert await get(store, "s/b") == b"v3"
    assert open_fds() == fds  # the directory and the temporary folder closed
    assert temp_files(store) == []


@pytest.mark.parametrize("spares", ["ring"], indirect=True)
@pytest.mark.parametrize("refusal", ["unusable", "refused"])
async def test_directory_fsync_rounds_go_to_a_thread_where_the_ring_cannot_take_them(
    store: LocalBackend,
    spares: local_module._Spares,
    refusal: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(local_module, "SPARE_MIN_AGE", 60.0)  # three spares pile up
    keys = [f"s/{number}" for number in range(3)]
    for version in (b"v1", b"v2"):
        for key in keys:
            await put(store, key, version)
    assert len(spare_files(store)) == 3
    monkeypatch.setattr(local_module, "SPARE_MIN_AGE", 0.0)
    ring = store._ring
    assert ring is not None
    if refusal == "unusable":
        monkeypatch.setattr(ring, "usable", lambda count: False)
    else:

        def refusing(ops: list[_uring.Op]) -> asyncio.Future[list[int]]:
            raise OSError(errno.EAGAIN, "the kernel took none")

        monkeypatch.setattr(ring, "run", refusing)
    gate = threading.Event()
    calls: list[int] = []
    real = local_module._fsync_result

    @functools.wraps(real)
    def first_held(fd: int) -> list[int]:
        calls.append(fd)
        if len(calls) == 1:
            gate.wait(5)  # the first round runs until every write has renamed
        return real(fd)

    monkeypatch.setattr(local_module, "_fsync_result", first_held)
    rounds = _Rounds(store, monkeypatch)
    trips = _spy_trips(monkeypatch)
    try:
        writes = [asyncio.create_task(put(store, key, b"v3")) for key in keys]
        await rounds.until(asked=3)  # all renamed while the first round runs (or waits)
        assert trips.count("_fsync_result") == 1
        assert not any(write.done() for write in writes)
    finally:
        gate.set()
    await asyncio.wait_for(asyncio.gather(*writes), 5)
    assert sorted(trips) == ["_fill_and_seal"] * 3 + ["_fsync_result"] * 2
    assert len(calls) == 2  # the first write's round, then one for the other two
    assert [await get(store, key) for key in keys] == [b"v3"] * 3
    assert len(spare_files(store)) == 3  # the v2 files, kept once their rounds ended
    assert temp_files(store) == []
    assert store._dir_syncs._running == {}


# -- symbolic links are never followed ---------------------------------------------------------


class Planted:
    """A store with links planted in ``tenants/a`` that point at ``tenants/b``, at files
    outside the base, and at ``/``; ``unchanged()`` says whether every target is intact."""

    def __init__(self, store: LocalBackend, outside: Path) -> None:
        self.store = store
        self.root = base(store)
        self.outside = outside

    async def plant(self) -> None:
        await put(self.store, "tenants/a/own.txt", b"a's own")
        await put(self.store, "tenants/b/secret.txt", b"b's secret")
        self.outside.mkdir()
        (self.outside / "target.txt").write_bytes(b"outside")
        a = self.root / "tenants/a"
        os.symlink(self.root / "tenants/b", a / "evil")  # absolute, to another tenant
        os.symlink("../b", a / "rel")  # relative, to another tenant
        os.symlink("/", a / "root")
        os.symlink("/etc/passwd", a / "passwd")
        os.symlink(self.outside / "target.txt", a / "outside")  # a file outside the base
        os.symlink(self.outside, a / "outdir")  # a directory outside the base
        self._before = self._state()

    def _state(self) -> tuple[object, ...]:
        passwd = os.stat("/etc/passwd")
        return (
            sorted(os.listdir(self.root / "tenants/b")),
            (self.root / "tenants/b/secret.txt").read_bytes(),
            sorted(os.listdir(self.outside)),
            (self.outside / "target.txt").read_bytes(),
            (passwd.st_size, passwd.st_mtime_ns),
            hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest(),
        )

    def unchanged(self) -> bool:
        return self._state() == self._before


@pytest.fixture
async def planted(store: LocalBackend, tmp_path: Path) -> Planted:
    planted = Planted(store, tmp_path / "outside")
    await planted.plant()
    return planted


Operation = Callable[[LocalBackend], Awaitable[object]]

REFUSED: dict[str, Operation] = {
    "info-of-dir-link": lambda s: s.info("tenants/a/evil"),
    "info-through-dir-link": lambda s: s.info("tenants/a/evil/secret.txt"),
    "info-through-relative-link": lambda s: s.info("tenants/a/rel/secret.txt"),
    "info-through-root-link": lambda s: s.info("tenants/a/root/etc/passwd"),
    "info-of-file-link": lambda s: s.info("tenants/a/passwd"),
    "size-of-file-link": lambda s: s.file_size("tenants/a/passwd"),
    "size-of-dir-link": lambda s: s.file_size("tenants/a/evil"),
    "size-through-dir-link": lambda s: s.file_size("tenants/a/evil/secret.txt"),
    "read-of-file-link": lambda s: s.open_read("tenants/a/passwd"),
    "read-through-dir-link": lambda s: s.open_read("tenants/a/evil/secret.txt"),
    "read-through-root-link": lambda s: s.open_read("tenants/a/root/etc/passwd"),
    "write-onto-file-link": lambda s: put(s, "tenants/a/outside", b"pwned"),
    "exclusive-write-onto-file-link": lambda s: put(s, "tenants/a/outside", b"x", exclusive=True),
    "write-through-dir-link": lambda s: put(s, "tenants/a/evil/new.txt", b"pwned"),
    "write-deep-through-dir-link": lambda s: put(s, "tenants/a/evil/x/y.txt", b"pwned"),
    "write-through-outside-link": lambda s: put(s, "tenants/a/outdir/new.txt", b"pwned"),
    "write-over-secret-through-link": lambda s: put(s, "tenants/a/rel/secret.txt", b"pwned"),
    "list-of-dir-link": lambda s: s.list("tenants/a/evil"),
    "recursive-list-of-dir-link": lambda s: s.list("tenants/a/evil", recursive=True),
    "list-through-root-link": lambda s: s.list("tenants/a/root/etc"),
    "delete-of-file-link": lambda s: s.delete("tenants/a/passwd"),
    "delete-through-dir-link": lambda s: s.delete("tenants/a/evil/secret.txt"),
    "delete-prefix-of-dir-link": lambda s: s.delete_prefix("tenants/a/evil"),
    "delete-prefix-of-outside-link": lambda s: s.delete_prefix("tenants/a/outdir"),
    "move-of-dir-link": lambda s: s.move("tenants/a/evil", "tenants/a/stolen"),
    "move-of-file-link": lambda s: s.move("tenants/a/passwd", "tenants/a/pw"),
    "move-from-through-link": lambda s: s.move("tenants/a/evil/secret.txt", "tenants/a/st.txt"),
    "move-to-through-link": lambda s: s.move("tenants/a/own.txt", "tenants/a/evil/own.txt"),
    "move-to-outside-link": lambda s: s.move("tenants/a/own.txt", "tenants/a/outdir/own.txt"),
    "mkdir-of-link": lambda s: s.mkdir("tenants/a/evil"),
    "mkdir-through-link": lambda s: s.mkdir("tenants/a/evil/sub"),
    "mkdir-through-outside-link": lambda s: s.mkdir("tenants/a/outdir/sub"),
}


@pytest.mark.parametrize("operation", REFUSED.values(), ids=REFUSED.keys())
async def test_symbolic_links_are_refused_with_permission_error(
    planted: Planted, operation: Operation
) -> None:
    with pytest.raises(PermissionError) as raised:
        await operation(planted.store)
    assert raised.value.errno == errno.ELOOP
    assert planted.unchanged()
    assert await get(planted.store, "tenants/a/own.txt") == b"a's own"
    assert os.path.islink(planted.root / "tenants/a/evil")


async def test_listings_skip_symbolic_links(planted: Planted) -> None:
    store = planted.store
    assert await names(store, "tenants/a") == ["tenants/a/own.txt"]
    assert await names(store, "tenants/a", recursive=True) == ["tenants/a/own.txt"]
    assert await names(store, "tenants", recursive=True) == [
        "tenants/a/own.txt",
        "tenants/b/secret.txt",
    ]
    assert planted.unchanged()


async def test_delete_prefix_removes_links_but_never_their_targets(planted: Planted) -> None:
    assert await planted.store.delete_prefix("tenants/a") == 1  # own.txt; links are not files
    assert not os.path.lexists(planted.root / "tenants/a")
    assert planted.unchanged()
    assert await get(planted.store, "tenants/b/secret.txt") == b"b's secret"


async def test_link_swapped_in_during_a_write_is_not_followed(planted: Planted) -> None:
    store = planted.store
    await store.mkdir("tenants/a/dir")

    async def swapping() -> AsyncIterator[bytes]:
        yield b"first part, "
        # After the write's checks, its directory becomes a link to another tenant.
        os.rmdir(planted.root / "tenants/a/dir")
        os.symlink(planted.root / "tenants/b", planted.root / "tenants/a/dir")
        yield b"second part"

    with pytest.raises(PermissionError) as raised:
        await store.write("tenants/a/dir/secret.txt", swapping())
    assert raised.value.errno == errno.ELOOP
    assert planted.unchanged()
    assert temp_files(store) == []


# -- descriptors and full disks ----------------------------------------------------------------


async def test_descriptors_are_all_closed_after_reads_writes_and_failures(
    store: LocalBackend,
) -> None:
    await put(store, "warm/up", b"x")  # the first call starts the worker threads
    await get(store, "warm/up")
    before = open_fds()

    for i in range(10):
        await put(store, f"fd/{i}/file.bin", bytes([i]) * (MiB + i), metadata={"i": str(i)})
    for i in range(10):
        assert len(await get(store, f"fd/{i}/file.bin")) == MiB + i
        assert await get(store, f"fd/{i}/file.bin", 10, 20) == bytes([i]) * 10
        await store.info(f"fd/{i}/file.bin")
    async with await store.open_read("fd/0/file.bin") as reader:
        async for _ in reader.chunks():
            break  # abandoned mid-way
    with pytest.raises(UploadFailed):
        await store.write("fd/0/file.bin", failing_body(b"x" * (2 * MiB)))
    with pytest.raises(FileExistsError):
        await put(store, "fd/1/file.bin", exclusive=True)
    with pytest.raises(FileNotFoundError):
        await store.info("fd/none")
    with pytest.raises(FileNotFoundError):
        await store.open_read("fd/0/file.bin/below")
    with pytest.raises(IsADirectoryError):
        await store.open_read("fd/0")
    with pytest.raises(NotADirectoryError):
        await store.list("fd/0/file.bin")
    await store.list("fd", recursive=True, limit=3)
    await store.move("fd/9", "fd/moved")
    await store.delete("fd/8/file.bin")
    assert await store.delete_prefix("fd") == 9

    assert open_fds() == before


@pytest.fixture
def small_file_system(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (skips where mounting is not allowed)."""
    with mounted_tmpfs(tmp_path / "small", "1m") as mount_point:
        yield mount_point


async def test_full_file_system_raises_enospc_and_keeps_the_old_object(
    small_file_system: Path,
) -> None:
    store = LocalBackend(small_file_system / "store")
    try:
        await store.start()
    except ValueError:
        pytest.skip("this kernel's tmpfs has no user extended attributes")
    await put(store, "keep.bin", b"k" * (256 * 1024), metadata={"v": "1"})
    with pytest.raises(OSError) as raised:
        await store.write("keep.bin", body(*[b"n" * MiB] * 2))
    assert raised.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as raised:
        await store.write("new.bin", body(*[b"n" * MiB] * 2))
    assert raised.value.errno == errno.ENOSPC
    assert temp_files(store) == []
    assert await get(store, "keep.bin") == b"k" * (256 * 1024)
    assert dict((await store.info("keep.bin")).metadata) == {"v": "1"}
    assert not await store.exists("new.bin")
    await put(store, "after.bin", b"a" * (256 * 1024))  # the failed writes freed their space


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
async def test_disk_full_error_propagates_and_leaves_no_temporary_file(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    # The same as above on any machine: the disk fills after the first megabyte.
    await put(store, "d/file", b"old")
    real_writev = os.writev
    written = 0

    def filling_writev(fd: int, buffers: list[memoryview]) -> int:
        nonlocal written
        if written >= MiB:
            raise OSError(code, os.strerror(code))
        count = real_writev(fd, buffers)
        written += count
        return count

    monkeypatch.setattr(os, "writev", filling_writev)
    with pytest.raises(OSError) as raised:
        await store.write("d/file", body(*[b"n" * MiB] * 3))
    monkeypatch.undo()
    assert raised.value.errno == code
    assert temp_files(store) == []
    assert await get(store, "d/file") == b"old"


# -- the scan cache of large directories -----------------------------------------------------


async def list_all(store: LocalBackend, key: str, limit: int = 500) -> list[str]:
    found: list[str] = []
    cursor = None
    while True:
        page = await store.list(key, limit=limit, start_after=cursor)
        found += [info.name for info in page.entries]
        cursor = page.next_cursor
        if cursor is None:
            return found


def settle(directory: Path, *, whole_seconds: bool = False) -> None:
    """Date the directory's last change a minute back, as if nothing had touched it since
    (``whole_seconds``: on a whole second, as a file system with a coarse clock would)."""
    past = directory.stat().st_mtime_ns - 60 * 10**9
    past -= past % 10**9
    if not whole_seconds:
        past += 123_456_789
    os.utime(directory, ns=(past, past))


async def test_paging_a_large_directory_sees_every_change(store: LocalBackend) -> None:
    folder = base(store) / "big"
    folder.mkdir()
    count = local_module._ScanCache.MIN_ENTRIES + 200
    for i in range(count):
        (folder / f"o{i:05d}").write_bytes(b"x")
    settle(folder)
    expected = [f"big/o{i:05d}" for i in range(count)]
    assert await list_all(store, "big") == expected
    assert await list_all(store, "big") == expected  # from the kept scan
    # Changes through the backend and behind its back, right after a scan was kept.
    await put(store, "big/o00000a", b"new")
    assert await list_all(store, "big") == sorted([*expected, "big/o00000a"])
    settle(folder)
    await list_all(store, "big")
    (folder / "o00003").unlink()
    assert "big/o00003" not in await list_all(store, "big")
    settle(folder)
    await list_all(store, "big")
    os.rename(folder / "o00004", folder / "zz")
    listed = await list_all(store, "big")
    assert "big/zz" in listed and "big/o00004" not in listed
    assert len(listed) == count  # +1 new, -1 deleted, one renamed


async def test_a_directory_changed_just_before_its_scan_is_not_kept(store: LocalBackend) -> None:
    folder = base(store) / "hot"
    folder.mkdir()
    for i in range(local_module._ScanCache.MIN_ENTRIES):
        (folder / f"o{i:05d}").write_bytes(b"x")
    # Its last change is now: another entry could still arrive within the same clock tick
    # without changing the directory's status, so this scan must not be reused.
    kept_before = dict(local_module._SCANS._scans)
    await list_all(store, "hot")
    assert local_module._SCANS._scans.keys() == kept_before.keys()
    settle(folder)
    await list_all(store, "hot")
    assert len(local_module._SCANS._scans) == len(kept_before) + 1


async def test_a_directory_with_a_coarse_clock_is_never_kept(store: LocalBackend) -> None:
    folder = base(store) / "coarse"
    folder.mkdir()
    for i in range(local_module._ScanCache.MIN_ENTRIES):
        (folder / f"o{i:05d}").write_bytes(b"x")
    settle(folder, whole_seconds=True)
    kept_before = dict(local_module._SCANS._scans)
    await list_all(store, "coarse")
    assert local_module._SCANS._scans.keys() == kept_before.keys()
