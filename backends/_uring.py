"""A small io_uring instance that an asyncio event loop drives (Linux, x86-64).

The local backend's small writes are a handful of system calls each (write, attribute,
``fsync``, rename, ``fsync`` of the directory). Made from a worker thread, every one of them
gives up the GIL and takes it back while the event loop runs Python, and under load those
hand-overs cost more CPU than the writes. Here the event loop queues a chain of them in one
``io_uring_enter``; the kernel runs them in order, those that may wait for the disk in its own
worker threads, which hold no GIL, and an ``eventfd`` wakes the loop with the results.

Only what the backend needs: ``openat``, ``write``, ``ftruncate``, ``fsetxattr`` and
``fsync`` (or ``fdatasync``), linked: each runs once the one before it has completed. A failed
``write`` or ``fsync`` ends the rest of its chain with ``ECANCELED``, but a failed
``ftruncate`` or ``fsetxattr`` does not (Linux 6.18): a caller checks every result.

:func:`open_ring` returns None where io_uring is missing, refused (seccomp in containers,
``kernel.io_uring_disabled``), lacks one of those operations (Linux before 6.9), or the
machine is not x86-64 (the rings are shared memory read and written from Python, which relies
on x86's ordering of plain loads and stores); callers then use threads.

Every buffer an operation points at (the body, the attribute's name and value, a path) is
referenced until that operation's completion arrives: the kernel may read it from one of its
worker threads after ``io_uring_enter`` has returned. Descriptors are the caller's to keep open
until the chain has completed: an operation that runs in the kernel's worker threads (``fsync``
always; any linked one) looks its descriptor up only when it runs, and a number closed meanwhile
could name another file by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import platform
import struct
import sys
from typing import Any, Final, NamedTuple

# <linux/io_uring.h>; the system call numbers are the same on every architecture.
_SYS_SETUP: Final = 425
_SYS_ENTER: Final = 426
_SYS_REGISTER: Final = 427
_OFF_SQ_RING: Final = 0  # and, with _FEAT_SINGLE_MMAP (required), the completion ring
_OFF_SQES: Final = 0x10000000
_FEAT_SINGLE_MMAP: Final = 1 << 0
_FEAT_NODROP: Final = 1 << 1
_SETUP_CQSIZE: Final = 1 << 3
_SETUP_SUBMIT_ALL: Final = 1 << 7
_REGISTER_EVENTFD: Final = 4
_REGISTER_PROBE: Final = 8
_OP_SUPPORTED: Final = 1
_SQE_IO_LINK: Final = 1 << 2
_SQ_CQ_OVERFLOW: Final = 1 << 1
_ENTER_GETEVENTS: Final = 1
_FSYNC_DATASYNC: Final = 1

OP_FSYNC: Final = 3
OP_OPENAT: Final = 18
OP_WRITE: Final = 23
OP_FSETXATTR: Final = 41
OP_FTRUNCATE: Final = 55
_NEEDED: Final = (OP_FSYNC, OP_OPENAT, OP_WRITE, OP_FSETXATTR, OP_FTRUNCATE)

_PARAMS: Final = struct.Struct("<7I12x8IQ8IQ")  # struct io_uring_params, 120 bytes
_SQE: Final = struct.Struct("<BBHiQQIIQHHiQ8x")  # struct io_uring_sqe, 64 bytes
_CQE: Final = struct.Struct("<QiI")  # struct io_uring_cqe, 16 bytes
_U32: Final = struct.Struct("<I")

ENTRIES: Final = 256  # submission queue; the completion queue has four times as many
# How often a ring with chains in flight looks for completions held back in the kernel's
# overflow list, which no eventfd wake-up reports (``Ring.overflowing``).
WATCH_SECONDS: Final = 0.1

log = logging.getLogger(__name__)


class Op(NamedTuple):
    """One system call for the ring, as the fields of its submission entry."""

    opcode: int
    fd: int
    addr: int
    length: int
    offset: int
    op_flags: int
    keep: tuple[object, ...]  # what ``addr``/``offset`` point into: alive until done


def _data_offset() -> int:
    """How far a ``bytes`` object's data lies from its ``id`` (CPython's object layout),
    measured once: ``id(data) + offset`` is then its address, without a ctypes object."""
    probe = b"where does the data start"
    address = ctypes.cast(ctypes.c_char_p(probe), ctypes.c_void_p).value
    assert address is not None
    return address - id(probe)


_DATA_OFFSET: Final = _data_offset()


def _address(buffer: bytes) -> int:
    """The address of the data of ``buffer``, a ``bytes`` object (immutable: it stays put)."""
    if type(buffer) is not bytes:
        raise TypeError("a bytes object is needed")
    return id(buffer) + _DATA_OFFSET


def openat(dir_fd: int, name: bytes, flags: int, mode: int) -> Op:
    """``name`` ends with a NUL byte; the result is the new descriptor."""
    return Op(OP_OPENAT, dir_fd, _address(name), mode, 0, flags, (name,))


def write(fd: int, data: bytes, offset: int = 0) -> Op:
    return Op(OP_WRITE, fd, _address(data), len(data), offset, 0, (data,))


def ftruncate(fd: int, length: int) -> Op:
    return Op(OP_FTRUNCATE, fd, 0, 0, length, 0, ())


def fsetxattr(fd: int, name: bytes, value: bytes) -> Op:
    """``name`` ends with a NUL byte."""
    return Op(OP_FSETXATTR, fd, _address(name), len(value), _address(value), 0, (name, value))


def fsync(fd: int) -> Op:
    return Op(OP_FSYNC, fd, 0, 0, 0, 0, ())


def fdatasync(fd: int) -> Op:
    return Op(OP_FSYNC, fd, 0, 0, 0, _FSYNC_DATASYNC, ())


class _Chain:
    """A chain in flight: its operations (their buffers alive), results, and how many to go."""

    __slots__ = ("future", "left", "ops", "results")

    def __init__(self, ops: list[Op], future: asyncio.Future[list[int]]) -> None:
        self.ops = ops
        self.future = future
        self.results = [0] * len(ops)
        self.left = len(ops)


_ZEROS: Final = (0,) * 6
_libc_syscall: Any = None


def _syscall(number: int, *args: int) -> int:
    """A raw system call (up to six arguments, each a C long: descriptors, counts,
    addresses, 0 for NULL); raises OSError on failure."""
    global _libc_syscall
    if _libc_syscall is None:
        function = ctypes.CDLL(None, use_errno=True).syscall
        function.restype = ctypes.c_long
        function.argtypes = (ctypes.c_long,) * 7  # converted in C: no ctypes object per call
        _libc_syscall = function
    result = int(_libc_syscall(number, *args, *_ZEROS[len(args) :]))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


class Ring:
    """An io_uring instance bound to the running event loop: ``run(ops)`` submits a linked
    chain and returns each operation's result (a count, 0, or ``-errno``)."""

    def __init__(self, entries: int = ENTRIES) -> None:
        self._loop = asyncio.get_running_loop()
        params = bytearray(_PARAMS.size)
        _PARAMS.pack_into(params, 0, entries, entries * 4, _SETUP_CQSIZE | _SETUP_SUBMIT_ALL,
                          *([0] * 4), *([0] * 8), 0, *([0] * 8), 0)  # fmt: skip
        buffer = (ctypes.c_char * len(params)).from_buffer(params)
        self._fd = _syscall(_SYS_SETUP, entries, ctypes.addressof(buffer))
        self._maps: list[mmap.mmap] = []
        self._efd = -1
        self._chains: dict[int, tuple[_Chain, int]] = {}
        self._next = 1
        self._watch: asyncio.TimerHandle | None = None
        self.overflows = 0  # times completions were found held back (``overflowing``)
        try:
            self._map(_PARAMS.unpack_from(params))
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            efd = ctypes.c_int(self._efd)
            _syscall(_SYS_REGISTER, self._fd, _REGISTER_EVENTFD, ctypes.addressof(efd), 1)
            self._supported = self._probe()
            self._loop.add_reader(self._efd, self._reap)
        except BaseException:
            self._release()
            raise

    def _map(self, p: tuple[int, ...]) -> None:
        sq_entries, cq_entries, _flags, _cpu, _idle, features, _wq = p[:7]
        _sq_head, sq_tail, sq_mask, _sq_n, sq_flags, _dropped, sq_array = p[7:14]
        cq_head, cq_tail, cq_mask, _cq_n, _overflow, cqes = p[16:22]
        if not features & _FEAT_SINGLE_MMAP or not features & _FEAT_NODROP:
            raise OSError(errno.ENOSYS, "io_uring too old")
        size = max(sq_array + sq_entries * 4, cqes + cq_entries * _CQE.size)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        rings = mmap.mmap(self._fd, size, flags, offset=_OFF_SQ_RING)
        self._maps.append(rings)
        sqes = mmap.mmap(self._fd, sq_entries * _SQE.size, flags, offset=_OFF_SQES)
        self._maps.append(sqes)
        self._rings, self._sqes = rings, sqes
        # The offsets say where each field is in the shared memory; the masks are read there.
        self._sq_tail_at, self._sq_flags_at = sq_tail, sq_flags
        self._sq_mask = _U32.unpack_from(rings, sq_mask)[0]
        self._cq_head_at, self._cq_tail_at, self._cqes_at = cq_head, cq_tail, cqes
        self._cq_mask = _U32.unpack_from(rings, cq_mask)[0]
        self._sq_entries, self._cq_entries = sq_entries, cq_entries
        for index in range(sq_entries):  # submission entry i sits at slot i, always
            _U32.pack_into(rings, sq_array + index * 4, index)
        self._sq_tail = _U32.unpack_from(rings, sq_tail)[0]
        self._cq_head = _U32.unpack_from(rings, cq_head)[0]

    def _probe(self) -> frozenset[int]:
        count = 256
        probe = (ctypes.c_ubyte * (16 + count * 8))()
        _syscall(_SYS_REGISTER, self._fd, _REGISTER_PROBE, ctypes.addressof(probe), count)
        ops_len = probe[1]
        return frozenset(
            probe[16 + i * 8] for i in range(ops_len) if probe[16 + i * 8 + 2] & _OP_SUPPORTED
        )

    def supports(self, *opcodes: int) -> bool:
        return all(opcode in self._supported for opcode in opcodes)

    def usable(self, count: int) -> bool:
        """Whether a chain of ``count`` operations can go now: on this ring's event loop, with
        room for its completions (the completion queue never overflows)."""
        return (
            self._fd >= 0
            and count <= self._sq_entries
            and len(self._chains) + count <= self._cq_entries
            and asyncio.get_running_loop() is self._loop
        )

    def run(self, ops: list[Op]) -> asyncio.Future[list[int]]:
        """Submit ``ops`` as one linked chain; the future gets their results, in order.

        Raises OSError if the kernel took none of them (nothing was done); check ``usable``
        first."""
        chain = _Chain(ops, self._loop.create_future())
        tail = self._sq_tail
        mask = self._sq_mask
        first = self._next
        last = len(ops) - 1
        for index, (opcode, fd, addr, length, offset, op_flags, _) in enumerate(ops):
            flags = _SQE_IO_LINK if index < last else 0
            slot = (tail + index) & mask
            _SQE.pack_into(self._sqes, slot * _SQE.size, opcode, flags, 0, fd, offset, addr,
                           length, op_flags, first + index, 0, 0, 0, 0)  # fmt: skip
        new_tail = (tail + len(ops)) & 0xFFFFFFFF
        _U32.pack_into(self._rings, self._sq_tail_at, new_tail)
        while True:
            try:
                taken = _syscall(_SYS_ENTER, self._fd, len(ops), 0, 0, 0, 0)
            except InterruptedError:
                continue
            except OSError:
                _U32.pack_into(self._rings, self._sq_tail_at, tail)  # the kernel took none
                raise
            break
        self._next = first + len(ops)
        for index in range(taken):
            self._chains[first + index] = (chain, index)
        if taken < len(ops):
            # The kernel could not take them all (out of memory): the rest are never run,
            # and this ring is used no more. (Not resubmitted: they would form a new chain,
            # not ordered after the first part.)
            new_tail = (tail + taken) & 0xFFFFFFFF
            _U32.pack_into(self._rings, self._sq_tail_at, new_tail)
            for index in range(taken, len(ops)):
                chain.results[index] = -errno.ECANCELED
            chain.left = taken
            if taken == 0:
                chain.future.set_result(chain.results)
            self._broken()
        self._sq_tail = new_tail
        if self._watch is None:
            self._watch = self._loop.call_later(WATCH_SECONDS, self._look)
        if self.overflowing():
            self._loop.call_soon(self._reap)
        return chain.future

    def _broken(self) -> None:
        self._sq_entries = 0  # usable() is False from now on; completions still arrive

    def overflowing(self) -> bool:
        """Whether the kernel holds completions back in its overflow list. They go there when
        the completion queue is full, and also, seen once under load on Linux 6.18, when it
        was all but empty (never full here: ``usable``); from the first one on, every
        completion goes there, none lands in the queue, and the eventfd, which counts only
        what lands there, stays silent. Only an ``io_uring_enter`` with ``GETEVENTS`` moves
        them into the queue: ``_reap`` makes it, run at once when a submission finds this, and
        by a watch every ``WATCH_SECONDS`` while chains are in flight (a completion may be held
        back while the loop waits for nothing else; the watch reaps whatever the queue holds)."""
        return self._fd >= 0 and bool(
            _U32.unpack_from(self._rings, self._sq_flags_at)[0] & _SQ_CQ_OVERFLOW
        )

    def _look(self) -> None:
        self._watch = None
        if self._fd < 0:
            return
        self._reap()  # also whatever an eventfd wake-up would have reported
        if self._chains:
            self._watch = self._loop.call_later(WATCH_SECONDS, self._look)

    def _reap(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(BlockingIOError):
            os.read(self._efd, 8)
        rings = self._rings
        chains = self._chains
        head = self._cq_head
        while True:
            tail = _U32.unpack_from(rings, self._cq_tail_at)[0]
            while head != tail:
                user_data, result, _flags = _CQE.unpack_from(
                    rings, self._cqes_at + (head & self._cq_mask) * _CQE.size
                )
                head = (head + 1) & 0xFFFFFFFF
                entry = chains.pop(user_data, None)
                if entry is None:
                    continue
                chain, index = entry
                chain.results[index] = result
                chain.left -= 1
                if chain.left == 0 and not chain.future.done():
                    chain.future.set_result(chain.results)
            self._cq_head = head
            _U32.pack_into(rings, self._cq_head_at, head)
            if not self.overflowing():
                return
            # The queue is empty now: the kernel moves what it held back into it.
            if not self.overflows:
                log.warning("io_uring held completions back (overflow); they are taken now")
            self.overflows += 1
            try:
                _syscall(_SYS_ENTER, self._fd, 0, 0, _ENTER_GETEVENTS, 0, 0)
            except OSError:  # e.g. interrupted: the watch comes back to it
                return
            if _U32.unpack_from(rings, self._cq_tail_at)[0] == head:
                return  # nothing moved (the watch looks again)

    async def close(self) -> None:
        """Wait for the chains in flight (the kernel may still read their buffers), then
        release the ring."""
        while self._chains:
            pending = {chain.future for chain, _ in self._chains.values()}
            await asyncio.wait(pending)
        self._release()

    def __del__(self) -> None:
        # A ring whose owner never closed it, collected once its event loop was: at least
        # its descriptors and mappings go.
        with contextlib.suppress(Exception):
            for mapping in self._maps:
                mapping.close()
            if self._efd >= 0:
                os.close(self._efd)
            if self._fd >= 0:
                os.close(self._fd)

    def _release(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._efd >= 0:
            self._loop.remove_reader(self._efd)
            os.close(self._efd)
            self._efd = -1
        for mapping in self._maps:
            mapping.close()
        self._maps.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_ring() -> Ring | None:
    """A ring for the running event loop, or None where it cannot serve (see the module)."""
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        ring = Ring()
    except OSError:
        return None
    if not ring.supports(*_NEEDED):
        ring._release()
        return None
    return ring
