"""``Backend.create_appendable``: a file that grows by appends (the local backend), by the
io_uring ring where the backend has one, else by worker threads; create-only, never through a
symbolic link; one append at a time; a failed or cancelled append breaks the object."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import backends.local as local_module
from backends import _uring
from backends.base import Appendable
from backends.local import XATTR, LocalBackend
from backends.memory import MemoryBackend
from tests.backends.helpers import eventually, get, put, started

KEY = "tenants/acme/logs/deep/segment.json"


@pytest.fixture(params=["ring", "thread"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LocalBackend]:
    """A started local backend: appends by its io_uring ring ("ring") or by worker threads
    ("thread", as with ``io_uring=False`` or where io_uring is missing). No journal: the
    ring's chains are the appends' own (the journal's are in test_journal)."""
    ring = request.param == "ring"
    async with started(LocalBackend(tmp_path / "store", io_uring=ring, journal=False)) as backend:
        if request.param == "ring":
            assert backend._ring is not None, "io_uring is available on this project's machines"
        else:
            assert backend._ring is None
        yield backend


@pytest.fixture
async def ring_store(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    """A started local backend with its io_uring ring."""
    async with started(LocalBackend(tmp_path / "store")) as backend:
        assert backend._ring is not None, "io_uring is available on this project's machines"
        yield backend


def on_ring(store: LocalBackend) -> bool:
    return store._ring is not None


def path_of(store: LocalBackend, key: str = KEY) -> Path:
    return Path(store.base_path) / key


def fds_to(path: Path) -> list[int]:
    """The descriptors of this process open on ``path``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            continue
        if target == str(path):
            found.append(int(name))
    return found


def fds_under(path: Path) -> set[tuple[int, str]]:
    """This process's descriptors on anything under ``path``."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            continue
        if target.startswith(str(path)):
            found.add((int(name), target))
    return found


class Paths:
    """Which way each append went: the ring's chains (their operations) and the worker
    threads' ``_write_at`` calls (the size of their data)."""

    def __init__(self, store: LocalBackend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.chains: list[list[_uring.Op]] = []
        self.threads: list[int] = []
        write_at = local_module._Appendable._write_at

        def spy_write_at(appendable: Any, data: bytes, offset: int) -> None:
            self.threads.append(len(data))
            write_at(appendable, data, offset)

        monkeypatch.setattr(local_module._Appendable, "_write_at", spy_write_at)
        ring = store._ring
        if ring is not None:
            run = ring.run

            def spy_run(ops: list[_uring.Op]) -> asyncio.Future[list[int]]:
                self.chains.append(list(ops))
                return run(ops)

            monkeypatch.setattr(ring, "run", spy_run)


class OsWith:
    """The ``os`` module as ``backends.local`` sees it, some functions replaced."""

    def __init__(self, **replaced: Any) -> None:
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


# -- appends -----------------------------------------------------------------------------------


async def test_appends_read_back_as_their_concatenation(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Paths(store, monkeypatch)
    appendable = await store.create_appendable(KEY, content_type="application/x-ndjson")
    assert isinstance(appendable, Appendable)
    assert appendable.size == 0
    assert path_of(store).is_file()  # made at once, its missing directories too
    assert path_of(store).read_bytes() == b""
    chunks = [b"first\n", b"", b"second line\n", os.urandom(70_000), b"end"]
    sizes = []
    for chunk in chunks:
        await appendable.append(chunk)
        sizes.append(appendable.size)
    expected = b"".join(chunks)
    assert sizes == [6, 6, 18, 70_018, 70_021]
    assert await get(store, KEY) == expected
    assert path_of(store).read_bytes() == expected
    info = await store.info(KEY)
    assert (info.size, info.content_type) == (len(expected), "application/x-ndjson")
    if on_ring(store):  # every append with bytes by the ring; the empty one has no write
        assert [[op.opcode for op in chain] for chain in paths.chains] == [
            [_uring.OP_WRITE, _uring.OP_FSYNC]
        ] * 4
        assert paths.threads == [0]
    else:
        assert paths.chains == []
        assert paths.threads == [len(chunk) for chunk in chunks]
    await appendable.close()
    assert await get(store, KEY) == expected


async def test_an_appendable_without_a_content_type_has_none(store: LocalBackend) -> None:
    appendable = await store.create_appendable("a/b.json")
    await appendable.append(b"x\n")
    await appendable.close()
    info = await store.info("a/b.json")
    assert (info.size, info.content_type, dict(info.metadata)) == (2, None, {})


async def test_an_appendable_in_an_existing_directory(store: LocalBackend) -> None:
    await put(store, "logs/other", b"o")
    appendable = await store.create_appendable("logs/new", content_type="text/plain")
    await appendable.append(b"hello")
    await appendable.close()
    assert await get(store, "logs/new") == b"hello"
    assert await get(store, "logs/other") == b"o"
    assert os.getxattr(path_of(store, "logs/new"), XATTR)  # its content type, as writes do


async def test_the_new_file_and_its_directory_are_fsynced(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put(store, "logs/seed", b"s")  # the directory exists: no fsync of a new one
    synced: list[str] = []

    def spy_fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append("dir" if stat.S_ISDIR(mode) else os.readlink(f"/proc/self/fd/{fd}"))
        os.fsync(fd)

    monkeypatch.setattr(local_module, "os", OsWith(fsync=spy_fsync))
    appendable = await store.create_appendable("logs/new.json", content_type="text/plain")
    monkeypatch.undo()
    try:
        assert sorted(synced) == sorted([str(path_of(store, "logs/new.json")), "dir"])
    finally:
        await appendable.close()


async def test_an_appendable_over_a_megabyte_in_one_append(store: LocalBackend) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    appendable = await store.create_appendable("big")
    await appendable.append(b"head")
    await appendable.append(data)
    await appendable.close()
    assert path_of(store, "big").read_bytes() == b"head" + data


# -- create-only, never through a link ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "directory", "link to a file", "dangling link"])
async def test_create_only_refuses_whatever_is_at_the_key(
    store: LocalBackend, tmp_path: Path, kind: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "target"
    at_key = path_of(store, "t/k")
    at_key.parent.mkdir(parents=True)
    if kind == "file":
        at_key.write_bytes(b"already here")
    elif kind == "directory":
        at_key.mkdir()
        (at_key / "inner").write_bytes(b"inner")
    elif kind == "link to a file":
        target.write_bytes(b"secret")
        at_key.symlink_to(target)
    else:
        at_key.symlink_to(target)  # points at nothing: must not be created through it
    before = fds_under(tmp_path)
    with pytest.raises(FileExistsError):
        await store.create_appendable("t/k", content_type="text/plain")
    assert fds_under(tmp_path) == before  # nothing left open
    if kind == "file":
        assert at_key.read_bytes() == b"already here"
        assert not at_key.is_symlink()
    elif kind == "directory":
        assert at_key.is_dir()
        assert [p.name for p in at_key.iterdir()] == ["inner"]
    else:
        assert at_key.is_symlink()
        assert os.readlink(at_key) == str(target)
    if kind == "link to a file":
        assert target.read_bytes() == b"secret"
        with pytest.raises(OSError):
            os.getxattr(target, XATTR)  # no content type set through the link either
    elif kind == "dangling link":
        assert not target.exists()
    if kind != "directory":
        assert sorted(p.name for p in outside.iterdir()) == (
            ["target"] if kind == "link to a file" else []
        )


@pytest.mark.parametrize("key", ["link/k", "link/sub/k", "real/link/k", "real/link/sub/deeper/k"])
async def test_a_link_as_a_directory_refuses_and_nothing_is_made_outside(
    store: LocalBackend, tmp_path: Path, key: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sub").mkdir()
    link = path_of(store, key.split("/link/")[0] + "/link" if "/link/" in key else "link")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    before = fds_under(tmp_path)
    with pytest.raises(PermissionError):
        await store.create_appendable(key, content_type="text/plain")
    assert fds_under(tmp_path) == before
    assert sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == ["sub"]
    assert link.is_symlink()


async def test_a_file_as_a_directory_refuses(store: LocalBackend) -> None:
    await put(store, "f", b"a file")
    with pytest.raises(NotADirectoryError):
        await store.create_appendable("f/k")
    assert await get(store, "f") == b"a file"


async def test_a_name_taken_after_a_refusal_is_still_refused_and_a_new_one_works(
    store: LocalBackend,
) -> None:
    first = await store.create_appendable("d/k")
    await first.append(b"one")
    with pytest.raises(FileExistsError):  # an appendable at the key is a file at the key
        await store.create_appendable("d/k")
    await first.append(b"two")
    await first.close()
    assert await get(store, "d/k") == b"onetwo"


# -- the ring ----------------------------------------------------------------------------------


async def test_the_ring_runs_one_chain_per_append_a_write_and_an_fdatasync(
    ring_store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ring_store
    appendable = await store.create_appendable(KEY)
    assert isinstance(appendable, local_module._Appendable)
    paths = Paths(store, monkeypatch)
    chunks = [b"a" * 10, b"bb" * 1000, b"c"]
    for chunk in chunks:
        await appendable.append(chunk)
    assert paths.threads == []
    assert len(paths.chains) == 3
    offset = 0
    for chain, chunk in zip(paths.chains, chunks, strict=True):
        write, sync = chain
        assert (write.opcode, write.fd, write.length, write.offset) == (
            _uring.OP_WRITE,
            appendable._fd,
            len(chunk),
            offset,
        )
        assert write.keep == (chunk,)
        assert (sync.opcode, sync.fd, sync.op_flags) == (_uring.OP_FSYNC, appendable._fd, 1)
        offset += len(chunk)
    await appendable.close()
    assert path_of(store).read_bytes() == b"".join(chunks)


def _bad_ring(store: LocalBackend, monkeypatch: pytest.MonkeyPatch, how: str) -> list[list[int]]:
    """Make the ring's chains come back bad, the way ``how`` says; return their results."""
    ring = store._ring
    assert ring is not None
    run = ring.run
    seen: list[list[int]] = []

    def bad_run(ops: list[_uring.Op]) -> asyncio.Future[list[int]]:
        write, sync = ops
        data = write.keep[0]
        assert isinstance(data, bytes)
        if how == "refused":
            raise OSError(errno.EAGAIN, "the kernel took none")
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        if how == "failed":  # nothing written
            future.set_result([-errno.EIO, -errno.ECANCELED])
            seen.append(future.result())
            return future
        if how == "short write":  # the kernel wrote only the first half
            half = data[: len(data) // 2]
            ops = [_uring.write(write.fd, half, write.offset), sync]
        real = run(ops)

        def done(real: asyncio.Future[list[int]]) -> None:
            results = list(real.result())
            if how == "short count":  # all written, a short count reported
                results[0] -= 1
            elif how == "sync failed":
                results[1] = -errno.EIO
            seen.append(results)
            future.set_result(results)

        real.add_done_callback(done)
        return future

    monkeypatch.setattr(ring, "run", bad_run)
    return seen


@pytest.mark.parametrize("how", ["short write", "short count", "sync failed", "failed", "refused"])
async def test_a_bad_ring_result_is_written_again_by_a_thread(
    ring_store: LocalBackend, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    store = ring_store
    appendable = await store.create_appendable(KEY, content_type="text/plain")
    await appendable.append(b"by the ring\n")
    paths = Paths(store, monkeypatch)
    seen = _bad_ring(store, monkeypatch, how)
    chunks = [b"0123456789" * 7, b"x", b"tail\n"]
    for chunk in chunks:
        await appendable.append(chunk)
    assert paths.threads == [len(chunk) for chunk in chunks]
    if how != "refused":
        assert len(seen) == 3
        assert all(
            results[0] != len(chunk) or results[1] != 0
            for results, chunk in zip(seen, chunks, strict=True)
        )
    expected = b"by the ring\n" + b"".join(chunks)
    assert appendable.size == len(expected)
    assert path_of(store).read_bytes() == expected
    await appendable.close()
    assert await get(store, KEY) == expected


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["pwrite", "fdatasync"])
async def test_a_failed_append_breaks_the_object(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    appendable = await store.create_appendable(KEY)
    await appendable.append(b"kept\n")
    calls: list[str] = []

    def fail(*args: Any) -> None:
        calls.append(failing)
        raise OSError(errno.ENOSPC, "no space left on device")

    if on_ring(store):
        _bad_ring(store, monkeypatch, "failed")  # the ring fails too: the thread is tried
    monkeypatch.setattr(local_module, "os", OsWith(**{failing: fail}))
    with pytest.raises(OSError) as failed:
        await appendable.append(b"lost\n")
    assert failed.value.errno == errno.ENOSPC
    assert calls == [failing]
    monkeypatch.undo()  # the disk works again: the object's end is still unknown
    for data in [b"more\n", b"", b"x"]:
        with pytest.raises(OSError) as broken:
            await appendable.append(data)
        assert broken.value.errno == errno.EIO
    assert calls == [failing]  # nothing tried
    assert appendable.size == 5
    assert isinstance(appendable, local_module._Appendable)
    content = path_of(store).read_bytes()
    if failing == "pwrite":
        assert content == b"kept\n"
    else:
        assert content.startswith(b"kept\n")
    fd = appendable._fd
    await appendable.close()
    await appendable.close()
    assert fd not in fds_to(path_of(store))


class _Held:
    """Once ``armed``, holds appends in flight: ``_write_at`` in its thread (until
    ``release``), or the ring's results (the chain runs; its future completes once released)."""

    def __init__(self, store: LocalBackend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()
        self.ring_release = asyncio.Event()
        write_at = local_module._Appendable._write_at

        def held_write_at(appendable: Any, data: bytes, offset: int) -> None:
            if not self.armed:
                return write_at(appendable, data, offset)
            self.entered.set()
            try:
                assert self.release.wait(10), "never released"
                write_at(appendable, data, offset)
            finally:
                self.finished.set()

        monkeypatch.setattr(local_module._Appendable, "_write_at", held_write_at)
        ring = store._ring
        if ring is not None:
            run = ring.run

            def held_run(ops: list[_uring.Op]) -> asyncio.Future[list[int]]:
                real = run(ops)
                if not self.armed:
                    return real
                self.entered.set()

                async def later() -> list[int]:
                    results = await real
                    await self.ring_release.wait()
                    self.finished.set()
                    return results

                return asyncio.ensure_future(later())

            monkeypatch.setattr(ring, "run", held_run)

    def set(self) -> None:
        self.release.set()
        self.ring_release.set()


@pytest.fixture
def held(store: LocalBackend, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Held]:
    hold = _Held(store, monkeypatch)
    try:
        yield hold
    finally:
        hold.set()  # never leave a worker thread waiting


async def _cancelled_mid_flight(appendable: Appendable, held: _Held, data: bytes) -> None:
    task = asyncio.create_task(appendable.append(data))
    await eventually(held.entered.is_set)
    await asyncio.sleep(0.01)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancelled_append_keeps_the_descriptor_open_until_its_write_ends(
    store: LocalBackend, held: _Held
) -> None:
    appendable = await store.create_appendable(KEY)
    await appendable.append(b"before\n")  # not held
    held.armed = True
    assert isinstance(appendable, local_module._Appendable)
    fd = appendable._fd
    assert fds_to(path_of(store)) == [fd]
    await _cancelled_mid_flight(appendable, held, b"in flight\n")
    await appendable.close()
    await appendable.close()  # twice: nothing more
    await asyncio.sleep(0.05)
    assert fds_to(path_of(store)) == [fd]  # the ring or the thread still writes through it
    os.fstat(fd)
    held.set()
    await eventually(held.finished.is_set)
    await eventually(lambda: fds_to(path_of(store)) == [])
    # what was in flight was written whole: the cancel only stopped the waiting
    assert path_of(store).read_bytes() == b"before\n" + b"in flight\n"
    with pytest.raises(ValueError):
        await appendable.append(b"x")


async def test_after_a_cancelled_append_every_later_append_raises_eio(
    store: LocalBackend, held: _Held
) -> None:
    appendable = await store.create_appendable(KEY)
    await appendable.append(b"before\n")
    held.armed = True
    await _cancelled_mid_flight(appendable, held, b"in flight\n")
    held.set()
    await eventually(held.finished.is_set)
    await asyncio.sleep(0.05)  # its completion reaches the event loop
    try:
        for data in [b"after\n", b"again\n"]:
            with pytest.raises(OSError) as broken:
                await appendable.append(data)
            assert broken.value.errno == errno.EIO
    finally:
        await appendable.close()
    assert path_of(store).read_bytes() == b"before\n" + b"in flight\n"


async def test_a_cancelled_create_closes_the_descriptor_it_opened(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    finished = threading.Event()
    create = LocalBackend._create_appendable

    def held_create(backend: LocalBackend, *args: Any) -> int:
        entered.set()
        try:
            assert release.wait(10), "never released"
            return create(backend, *args)
        finally:
            finished.set()

    monkeypatch.setattr(LocalBackend, "_create_appendable", held_create)
    try:
        task = asyncio.create_task(store.create_appendable("c/k"))
        await eventually(entered.is_set)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        release.set()
    await eventually(finished.is_set)
    await eventually(lambda: path_of(store, "c/k").exists() and fds_to(path_of(store, "c/k")) == [])
    assert path_of(store, "c/k").read_bytes() == b""  # it stays, empty


# -- one at a time, and after close ------------------------------------------------------------


async def test_one_append_at_a_time(store: LocalBackend) -> None:
    appendable = await store.create_appendable(KEY)
    first = asyncio.create_task(appendable.append(b"first\n"))
    await asyncio.sleep(0)  # the first is under way (in the ring or a thread)
    assert not first.done()
    with pytest.raises(RuntimeError):
        await appendable.append(b"second\n")
    await first
    assert appendable.size == 6
    await appendable.append(b"third\n")  # the refused one broke nothing
    await appendable.close()
    assert path_of(store).read_bytes() == b"first\nthird\n"


async def test_append_after_close_raises_and_close_twice_is_fine(store: LocalBackend) -> None:
    appendable = await store.create_appendable(KEY)
    await appendable.append(b"data")
    fds = fds_to(path_of(store))
    assert len(fds) == 1
    await appendable.close()
    assert fds_to(path_of(store)) == []
    await appendable.close()
    with pytest.raises(ValueError):
        await appendable.append(b"more")
    assert appendable.size == 4
    assert path_of(store).read_bytes() == b"data"


# -- stores that cannot append -----------------------------------------------------------------


async def test_the_memory_backend_cannot_append() -> None:
    backend = MemoryBackend()
    await backend.start()
    try:
        assert await backend.create_appendable("a/b", content_type="text/plain") is None
        assert not await backend.exists("a/b")
    finally:
        await backend.close()


# -- found in review -----------------------------------------------------------------------------


async def test_a_close_during_a_failing_ring_append_writes_nowhere(
    ring_store: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ring's attempt fails after close() (which closes the descriptor once the chain is
    # done): the append must not go on in a thread with a number another file may now have.
    appendable = await ring_store.create_appendable(KEY)
    assert isinstance(appendable, local_module._Appendable)
    held: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
    ring = ring_store._ring
    assert ring is not None
    monkeypatch.setattr(ring, "run", lambda ops: held)
    task = asyncio.create_task(appendable.append(b"audit-line\n"))
    await asyncio.sleep(0.01)
    await appendable.close()
    victim = tmp_path / "victim"
    reused: list[int] = []
    held.add_done_callback(lambda _: reused.append(os.open(victim, os.O_RDWR | os.O_CREAT)))
    held.set_result([-errno.EIO, -errno.ECANCELED])
    with pytest.raises(ValueError, match="closed"):
        await task
    try:
        assert victim.read_bytes() == b""
    finally:
        os.close(reused[0])
    assert path_of(ring_store).read_bytes() == b""


async def test_a_failed_fdatasync_cuts_what_the_append_wrote(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    appendable = await store.create_appendable(KEY)
    await appendable.append(b"kept\n")

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", failing)
    if store._ring is not None:  # the ring's attempt fails too: the thread's is the last word
        monkeypatch.setattr(store._ring, "usable", lambda count: False)
    with pytest.raises(OSError):
        await appendable.append(b"not acknowledged\n")
    await appendable.close()
    assert path_of(store).read_bytes() == b"kept\n"
