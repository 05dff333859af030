"""The io_uring ring of the local backend's small writes (backends/_uring.py), and how the
backend falls back to worker threads when the ring fails it."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import backends.local as local_module
from backends import _uring
from backends.local import XATTR, LocalBackend
from gateway.app import make_backend
from gateway.config import load
from tests.backends.helpers import get, put


@pytest.fixture
async def ring() -> AsyncIterator[_uring.Ring]:
    opened = _uring.open_ring()
    assert opened is not None, "io_uring is available on this project's machines"
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_chain_runs_in_order_and_returns_each_result(
    ring: _uring.Ring, tmp_path: Path
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"an older and longer content")
    fd = os.open(path, os.O_RDWR)
    try:
        ops = [
            _uring.write(fd, b"new"),
            _uring.ftruncate(fd, 3),
            _uring.fsetxattr(fd, b"user.test\0", b'{"a":1}'),
            _uring.fsync(fd),
        ]
        assert await ring.run(ops) == [3, 0, 0, 0]
    finally:
        os.close(fd)
    assert path.read_bytes() == b"new"
    assert os.getxattr(path, "user.test") == b'{"a":1}'


async def test_a_failed_write_cancels_the_rest_of_its_chain(
    ring: _uring.Ring, tmp_path: Path
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"kept")
    fd = os.open(path, os.O_RDONLY)  # not open for writing
    try:
        ops = [_uring.write(fd, b"never"), _uring.fsetxattr(fd, b"user.t\0", b"1")]
        assert await ring.run(ops) == [-errno.EBADF, -errno.ECANCELED]
    finally:
        os.close(fd)
    assert path.read_bytes() == b"kept"
    with pytest.raises(OSError):
        os.getxattr(path, "user.t")


async def test_a_failed_attribute_does_not_stop_its_chain(
    ring: _uring.Ring, tmp_path: Path
) -> None:
    # Why the backend checks every result: after a failed fsetxattr the fsync still runs.
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        ops = [_uring.fsetxattr(fd, b"no-such-namespace.x\0", b"1"), _uring.write(fd, b"ran")]
        results = await ring.run(ops)
    finally:
        os.close(fd)
    assert results[0] < 0 and results[1] == 3


async def test_many_chains_at_once_each_get_their_own_results(
    ring: _uring.Ring, tmp_path: Path
) -> None:
    fds = [os.open(tmp_path / f"f{n}", os.O_RDWR | os.O_CREAT) for n in range(100)]
    try:
        chains = [
            ring.run([_uring.write(fd, b"x" * n), _uring.fsync(fd)]) for n, fd in enumerate(fds)
        ]
        assert await asyncio.gather(*chains) == [[n, 0] for n in range(100)]
    finally:
        for fd in fds:
            os.close(fd)
    assert [(tmp_path / f"f{n}").stat().st_size for n in range(100)] == list(range(100))


async def test_close_waits_for_the_chains_in_flight(tmp_path: Path) -> None:
    ring = _uring.open_ring()
    assert ring is not None
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        running = ring.run([_uring.write(fd, b"a" * 65536), _uring.fsync(fd)])
        await ring.close()
        assert running.done() and running.result() == [65536, 0]
    finally:
        os.close(fd)
    assert not ring.usable(1)


async def test_a_ring_serves_only_its_own_event_loop(ring: _uring.Ring) -> None:
    assert ring.usable(4)
    seen: list[bool] = []

    def elsewhere() -> None:
        async def check() -> None:
            seen.append(ring.usable(1))

        asyncio.run(check())

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert seen == [False]


async def test_where_io_uring_is_refused_there_is_no_ring(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refused(number: int, *args: int) -> int:
        raise PermissionError(errno.EPERM, "io_uring_setup refused (seccomp)")

    monkeypatch.setattr(_uring, "_syscall", refused)
    assert _uring.open_ring() is None
    store = LocalBackend(tmp_path / "store")
    await store.start()
    try:
        assert store._ring is None
        monkeypatch.setattr(local_module, "SPARE_MIN_AGE", 0.0)
        store._spares = local_module._Spares()
        for body in (b"one", b"two", b"three"):  # over spares, by threads
            await put(store, "k", body, content_type="text/plain")
        assert await get(store, "k") == b"three"
    finally:
        await store.close()


@pytest.mark.parametrize(
    "failure",
    ["short write", "attribute refused", "fsync failed"],
)
async def test_a_write_the_ring_could_not_finish_is_made_again_by_a_thread(
    failure: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = LocalBackend(tmp_path / "store", journal=False)
    await store.start()
    try:
        monkeypatch.setattr(local_module, "SPARE_MIN_AGE", 0.0)
        monkeypatch.setattr(local_module, "_MTIME_MARGIN_NS", 0)  # the ring takes it at once
        store._spares = local_module._Spares()
        if store._ring is None:
            store._ring = _uring.open_ring()
        ring = store._ring
        assert ring is not None
        await put(store, "a", b"first version, longer")
        await put(store, "a", b"second")  # the first file is now a spare
        run = ring.run
        spoilers: dict[str, Callable[[list[int]], list[int]]] = {
            "short write": lambda results: [2, *results[1:]],
            "attribute refused": lambda results: [*results[:-2], -errno.ENOTSUP, results[-1]],
            "fsync failed": lambda results: [*results[:-1], -errno.EIO],
        }
        bad = spoilers[failure]

        spoiled: list[list[int]] = []

        def failing(ops: list[_uring.Op]) -> asyncio.Future[list[int]]:
            done = run(ops)
            if ops[0].opcode != _uring.OP_WRITE:
                return done
            spoiled.append([op.opcode for op in ops])

            async def worse() -> list[int]:
                return bad(await done)

            return asyncio.ensure_future(worse())

        monkeypatch.setattr(ring, "run", failing)
        sealed = local_module._TempFile.seal
        thread_seals: list[bool] = []

        def seal(temp: local_module._TempFile, xattr: bytes | None) -> None:
            thread_seals.append(True)
            sealed(temp, xattr)

        monkeypatch.setattr(local_module._TempFile, "seal", seal)
        await put(store, "b", b"over the spare", content_type="text/csv")
        write, truncate, xattr, fsync = (
            _uring.OP_WRITE, _uring.OP_FTRUNCATE, _uring.OP_FSETXATTR, _uring.OP_FSYNC,
        )  # fmt: skip
        assert spoiled == [[write, truncate, xattr, fsync]]  # the ring tried first
        assert thread_seals == [True]
        assert await get(store, "b") == b"over the spare"
        info = await store.info("b")
        assert (info.size, info.content_type) == (14, "text/csv")
        assert os.getxattr(Path(store.base_path) / "b", XATTR)
    finally:
        await store.close()


@pytest.mark.parametrize(("setting", "expected"), [("true", True), ("false", False)])
async def test_storage_local_io_uring_turns_the_ring_on_and_off(
    setting: str, expected: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load(
        environ={
            "GATEWAY_STORAGE_LOCAL_BASE_PATH": str(tmp_path / "store"),
            "GATEWAY_STORAGE_LOCAL_IO_URING": setting,
        }
    )
    store = make_backend(config)
    assert isinstance(store, LocalBackend)
    await store.start()
    try:
        assert (store._ring is not None) is expected
        chains: list[int] = []
        if store._ring is not None:
            run = store._ring.run

            def counting(ops: list[_uring.Op]) -> asyncio.Future[list[int]]:
                chains.append(len(ops))
                return run(ops)

            monkeypatch.setattr(store._ring, "run", counting)
        await put(store, "k", b"v1")
        await put(store, "k", b"v2")
        assert await get(store, "k") == b"v2"
        assert (chains != []) is expected  # the ring made the writes
    finally:
        await store.close()


async def test_a_chain_the_kernel_took_only_in_part_ends_and_the_ring_is_left(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ring = _uring.open_ring()
    assert ring is not None
    real = _uring._syscall

    def short(number: int, *args: int) -> int:
        if number == _uring._SYS_ENTER and args[1] > 1:  # the kernel takes all but one
            return real(number, args[0], args[1] - 1, *args[2:])
        return real(number, *args)

    monkeypatch.setattr(_uring, "_syscall", short)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        results = await asyncio.wait_for(ring.run([_uring.write(fd, b"abc"), _uring.fsync(fd)]), 5)
        assert results == [3, -errno.ECANCELED]  # the fsync never ran: the caller sees it
        assert not ring.usable(1)
        await asyncio.wait_for(ring.close(), 5)
    finally:
        os.close(fd)


async def test_completions_the_kernel_held_back_in_overflow_still_arrive(tmp_path: Path) -> None:
    # A completion queue of four, and six operations before the loop looks: two completions
    # go to the kernel's overflow list, which wakes nobody (the eventfd counts only what
    # lands in the queue). They must still arrive, here and whenever an overflow occurs
    # (seen once under load on Linux 6.18 with the queue all but empty, leaving a worker's
    # requests waiting forever).
    ring = _uring.Ring(entries=1)
    fds = [os.open(tmp_path / f"f{n}", os.O_RDWR | os.O_CREAT) for n in range(6)]
    try:
        chains = [ring.run([_uring.fsync(fd)]) for fd in fds]
        deadline = time.monotonic() + 5
        while not ring.overflowing() and time.monotonic() < deadline:
            time.sleep(0.01)  # the event loop does not run: nothing is reaped meanwhile
        assert ring.overflowing()
        assert await asyncio.wait_for(asyncio.gather(*chains), 5) == [[0]] * 6
        assert not ring.overflowing()
    finally:
        await ring.close()
        for fd in fds:
            os.close(fd)


async def test_a_completion_no_wake_up_reports_is_found_by_the_watch(
    ring: _uring.Ring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An overflow leaves the eventfd silent from its first held-back completion on (the case
    # seen): then only the ring's watch, every WATCH_SECONDS while chains are in flight, takes
    # the completions. Here the eventfd's wake-ups are not listened to at all.
    monkeypatch.setattr(_uring, "WATCH_SECONDS", 0.05)
    ring._loop.remove_reader(ring._efd)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        assert await asyncio.wait_for(ring.run([_uring.fsync(fd)]), 5) == [0]
    finally:
        os.close(fd)
        ring._loop.add_reader(ring._efd, ring._reap)
