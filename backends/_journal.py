"""The local backend's journal of small writes: one flush for many of them.

On a disk, a durable small write used to cost three flushes of the disk's cache: the file's
``fsync``, its directory's (shared by the writes renamed there meanwhile) and the audit
record's. Each is a synchronous device request (about 40% of a 4 KiB PUT's CPU on a virtio
disk). With the journal, a small write's file is written and renamed into place without
``fsync``; its key, attribute and body are appended, as one *content* record, to this process's
journal, together with those of every write that arrived meanwhile, by one ``write`` and one
``fdatasync`` of an already allocated file (group commit): the write is durable, and answered,
once that flush has completed. The file itself reaches the disk later, with the kernel's
writeback, or at a *checkpoint*.

After the machine crashed, ``LocalBackend.start`` replays the journals of the processes that
ran before (``plan`` and ``LocalBackend._replay``): for each key with records it makes the file
at the key hold the last acknowledged content, unless a later change there was made durable
by other means. Those other changes of one key (a large write, a delete) are made durable as
before, each followed by a *marker* record committed the same way before it is answered, so the
replay can tell that the key's journaled content was superseded (a file moved: flushed, and
both keys marked before the rename); a change of many keys at once (a directory moved, a prefix
deleted) is followed by a checkpoint (below). When only a process died (the
machine kept running), its files are in the kernel's cache, intact: a ``syncfs`` makes them
durable and its journal goes, unread. Boots are told apart by the kernel's boot id: where
there is none, there is no journal.

A journal is a few *segment* files ``journal-<n>`` in the process's temporary folder: a 4 KiB
header that holds the segment's generation, then records, each with a CRC-32. Reading stops
at the first record that is cut, damaged or of another generation, so a segment is reused
(from its start, a new generation in its header) without being cleared. A segment is reused
once a *checkpoint* covers it: a ``syncfs`` of the file system, after which every change made
before it began is durable, then a checkpoint record with that moment. A process that removes
a journal (at shutdown, or a dead process's, or spent ones after a replay) records such a
moment for the whole store instead (``LocalBackend``'s ``CHECKPOINT_NAME``): the records it
removes may be what supersedes other journals' older ones. The replay ignores the records
older than the latest checkpoint of any journal, or of the store.

Records are ordered by ``CLOCK_MONOTONIC``, read right after the change they record was made:
one clock for every process of one boot. Two writes of one key made at the same moment by two
processes may come back in either order after a crash (neither was answered before the other
began); a reader never sees a torn object.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from . import _uring

log = logging.getLogger(__name__)

CONTENT: Final = 1
"""A record of a small write: the key, its attribute, its body, the inode it was given."""
MARKER: Final = 2
"""A change at the key made durable by other means; ``inode``: the file there then (0: none)."""
CHECKPOINT: Final = 4
"""Every change made before ``stamp`` is durable (a ``syncfs`` that began after it ended)."""

SEGMENT_BYTES: Final = 16 * 1024 * 1024
"""A segment is left for the next one once it would grow past this size."""
HEADER_BYTES: Final = 4096
PREFIX_NAME: Final = "journal-"

_HEADER: Final = struct.Struct("<4sIQ")  # magic, CRC-32 of the generation, generation
_HEADER_MAGIC: Final = b"GWJH"
# magic, CRC-32 of the rest (header after it, and payload), generation, stamp, kind, inode,
# key length, attribute length, body length
_RECORD: Final = struct.Struct("<4sIQQBxxxQIII")
_RECORD_MAGIC: Final = b"GWJR"
_CRC_FROM: Final = 8  # the CRC covers a record from its generation on


@dataclass(frozen=True, slots=True)
class Record:
    stamp: int
    kind: int
    inode: int
    key: str
    xattr: bytes | None
    body: bytes


def encode(generation: int, stamp: int, kind: int, inode: int, key: str,
           xattr: bytes | None, body: bytes) -> bytes:  # fmt: skip
    name = key.encode()
    attribute = xattr or b""
    head = _RECORD.pack(_RECORD_MAGIC, 0, generation, stamp, kind, inode,
                        len(name), len(attribute), len(body))  # fmt: skip
    crc = zlib.crc32(head[_CRC_FROM:])
    crc = zlib.crc32(body, zlib.crc32(attribute, zlib.crc32(name, crc)))
    return b"".join((head[:4], crc.to_bytes(4, "little"), head[_CRC_FROM:], name, attribute, body))


def header(generation: int) -> bytes:
    number = generation.to_bytes(8, "little")
    return _HEADER.pack(_HEADER_MAGIC, zlib.crc32(number), generation).ljust(HEADER_BYTES, b"\0")


def decode(data: bytes) -> Iterator[Record]:
    """The records of one segment file's bytes, up to the first one cut or damaged, or of
    another generation than its header's. Nothing for a header that is not whole."""
    magic, crc, generation = _HEADER.unpack_from(data) if len(data) >= _HEADER.size else (b"",) * 3
    if magic != _HEADER_MAGIC or crc != zlib.crc32(generation.to_bytes(8, "little")):
        return
    view = memoryview(data)
    at = HEADER_BYTES
    while at + _RECORD.size <= len(data):
        magic, crc, gen, stamp, kind, inode, key_len, xattr_len, body_len = _RECORD.unpack_from(
            data, at
        )
        end = at + _RECORD.size + key_len + xattr_len + body_len
        if magic != _RECORD_MAGIC or gen != generation or end > len(data):
            return
        if zlib.crc32(view[at + _CRC_FROM : end]) != crc:
            return
        start = at + _RECORD.size
        try:
            key = bytes(view[start : start + key_len]).decode()
        except UnicodeDecodeError:
            return
        xattr = bytes(view[start + key_len : start + key_len + xattr_len]) or None
        body = bytes(view[start + key_len + xattr_len : end])
        yield Record(stamp, kind, inode, key, xattr, body)
        at = end


def read_folder(folder: int) -> list[Record]:
    """Every record of the journal segments in the folder ``folder`` (a descriptor)."""
    records: list[Record] = []
    for name in segment_names(folder):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
        try:
            with open(fd, "rb", closefd=False) as file:
                records.extend(decode(file.read()))
        finally:
            os.close(fd)
    return records


def segment_names(folder: int) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith(PREFIX_NAME))


def plan(records: Iterable[Record], since: int = 0) -> list[tuple[Record, Record | None]]:
    """What a replay must do, given the records of every journal of the processes that ran
    before a crash: for each key with content records newer than the last checkpoint, its
    last one, and the last marker after it that covers the key (or None).

    With no marker after it, the key must hold that content. With one, the key holds what a
    later durable change left there, unless the key's file is still the journaled one (its
    inode): then that change came first (two processes' changes, made at the same moment)
    and the content must be there. ``LocalBackend._replay`` tells which. ``since``: a
    checkpoint recorded outside the journals (``LocalBackend``'s ``CHECKPOINT_NAME``)."""
    records = list(records)
    since = max([since, *(r.stamp for r in records if r.kind == CHECKPOINT)])
    last: dict[str, Record] = {}
    marker: dict[str, Record | None] = {}
    for record in sorted(records, key=lambda r: r.stamp):
        if record.stamp < since or record.kind == CHECKPOINT:
            continue
        if record.kind == CONTENT:
            last[record.key] = record
            marker[record.key] = None
        elif record.kind == MARKER and record.key in last:
            marker[record.key] = record
    return [(record, marker[key]) for key, record in sorted(last.items())]


def check(outcome: list[int]) -> None:
    """Given what a ``Journal.commit`` future gave (``[0]`` or ``[-errno]``), raise if the
    record's batch failed."""
    (result,) = outcome
    if result < 0:
        raise OSError(-result, f"the journal could not record the change: {os.strerror(-result)}")


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """``syncfs(2)``: every change to the file system of ``fd`` made before the call is
    durable when it returns (its errors: those of the writebacks since the last call)."""
    if _libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class _Segment:
    __slots__ = ("end", "fd", "fresh", "generation", "last", "name", "new")

    def __init__(self, name: str, fd: int, generation: int, new: bool) -> None:
        self.name = name
        self.fd = fd
        self.generation = generation
        self.end = HEADER_BYTES  # where the next batch goes
        self.last = 0  # stamp of its newest record
        self.fresh = True  # its header is still to be written (with its first batch)
        self.new = new  # a file just made: the folder's fsync goes with that batch


_Pending = tuple[int, int, int, str, "bytes | None", bytes, "asyncio.Future[list[int]]"]


class Journal:
    """One process's journal (see the module), in its temporary folder ``folder`` (a
    descriptor the journal does not own), written by ``ring`` (else by worker threads).

    ``commit`` queues a record and returns the future of its batch's outcome, ``[0]`` or
    ``[-errno]`` (never cancelled): one batch is written at a time, and what is queued
    meanwhile goes into the next."""

    def __init__(
        self, folder: int, ring: _uring.Ring | None, segment_bytes: int = SEGMENT_BYTES
    ) -> None:
        self._folder = folder
        self._ring = ring
        self._segment_bytes = segment_bytes
        self._segments: list[_Segment] = []  # oldest first; the last one is written
        self._pending: list[_Pending] = []
        # A batch is being written, until its end is known (``_ended``: the future alone is
        # done earlier, before its callbacks have run).
        self._running = False
        self._in_flight: asyncio.Future[list[int]] | None = None
        self._generation = 0
        self._checkpointed = 0  # the stamp of the last checkpoint recorded
        self._checkpointing: asyncio.Future[None] | None = None
        self._closed = False
        # A checkpoint's syncfs failed: a writeback was lost, and the kernel reports that once
        # per open file. Nothing more is acknowledged, and no segment is reused (the records
        # may be the only copy).
        self._failed: OSError | None = None
        self.batches = 0  # batches written (for tests and metrics)
        self.records = 0
        # Told of each batch written ("batch", its records) and checkpoint ("checkpoint", 1).
        self.observer: Callable[[str, int], None] | None = None
        self.used = False  # a record was committed: close() makes the store durable first

    def commit(
        self,
        kind: int,
        key: str,
        inode: int = 0,
        xattr: bytes | None = None,
        body: bytes = b"",
        stamp: int | None = None,
    ) -> asyncio.Future[list[int]]:
        """Queue a record (stamped now, unless ``stamp``); see the class."""
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        if self._closed or self._failed is not None:
            future.set_result([-errno.EBADF if self._closed else -errno.EIO])
            return future
        moment = time.monotonic_ns() if stamp is None else stamp
        self._pending.append((moment, kind, inode, key, xattr, body, future))
        self.used = True
        if not self._running:
            self._start()
        return future

    @property
    def failed(self) -> bool:
        """Whether a checkpoint's ``syncfs`` failed (a lost writeback)."""
        return self._failed is not None

    async def checkpoint(self) -> None:
        """Make every change made so far durable (``syncfs``), then record that; at most one
        runs, and a caller that finds one running waits for it and starts the next."""
        while self._checkpointing is not None:
            await asyncio.shield(self._checkpointing)
        done = asyncio.get_running_loop().create_future()
        self._checkpointing = done
        try:
            moment = time.monotonic_ns()
            try:
                await asyncio.to_thread(syncfs, self._folder)
            except OSError as exc:
                if self._failed is None:
                    log.error("the store's writeback failed (%s): no write is acknowledged "
                              "any more; the journal is kept for the next start", exc)  # fmt: skip
                self._failed = exc
                raise
            check(await asyncio.shield(self.commit(CHECKPOINT, "", stamp=moment)))
            self._checkpointed = max(self._checkpointed, moment)
            self._observe("checkpoint", 1)
        finally:
            self._checkpointing = None
            done.set_result(None)

    def _start(self) -> None:
        batch, self._pending = self._pending, []
        try:
            size = sum(_RECORD.size + len(p[3].encode()) + len(p[4] or b"") + len(p[5])
                       for p in batch)  # fmt: skip
            segment = self._segment_for(size)
            data = b"".join(encode(segment.generation, *p[:6]) for p in batch)
        except Exception as exc:  # e.g. no descriptor left for a new segment
            self._finish(batch, -(getattr(exc, "errno", None) or errno.EIO))
            return
        steps: list[_uring.Op] = []
        if segment.fresh:
            steps.append(_uring.write(segment.fd, header(segment.generation), 0))
        steps.append(_uring.write(segment.fd, data, segment.end))
        if segment.new:  # allocating writes, and a new name: the inode and the folder too
            steps += [_uring.fsync(segment.fd), _uring.fsync(self._folder)]
        else:
            steps.append(_uring.fdatasync(segment.fd))
        self._running = True
        ring = self._ring
        running: asyncio.Future[list[int]] | None = None
        if ring is not None and ring.usable(len(steps)):
            with contextlib.suppress(OSError):  # the kernel took none: a thread does it
                running = ring.run(steps)
        if running is None:
            running = asyncio.ensure_future(asyncio.to_thread(_perform, steps))
        last = max(p[0] for p in batch)
        self._in_flight = running
        running.add_done_callback(
            lambda done: self._ended(batch, segment, steps, len(data), last, done)
        )

    def _ended(self, batch: list[_Pending], segment: _Segment, steps: list[_uring.Op],
               size: int, last: int, done: asyncio.Future[list[int]]) -> None:  # fmt: skip
        self._running = False
        result = 0
        if done.cancelled():
            result = -errno.ECANCELED
        elif (error := done.exception()) is not None:
            result = -(getattr(error, "errno", None) or errno.EIO)
        else:
            for step, outcome in zip(steps, done.result(), strict=True):
                expected = step.length if step.opcode == _uring.OP_WRITE else 0
                if outcome != expected:
                    result = outcome if outcome < 0 else -errno.EIO
                    break
        if result == 0:
            segment.end += size
            segment.last = max(segment.last, last)
            segment.fresh = segment.new = False
            self.batches += 1
            self.records += len(batch)
        # On failure the segment's end stays: the next batch is written over this one.
        self._finish(batch, result)
        if self._closed:  # (commits made while close() waited)
            pending, self._pending = self._pending, []
            self._finish(pending, -errno.EBADF)
        elif self._pending:
            self._start()
        if result == 0:
            self._observe("batch", len(batch))

    def _observe(self, kind: str, count: int) -> None:
        if self.observer is not None:
            try:
                self.observer(kind, count)
            except Exception:  # a metric is not worth a write
                log.exception("the journal's observer failed")

    @staticmethod
    def _finish(batch: list[_Pending], result: int) -> None:
        for *_, future in batch:
            if not future.done():
                future.set_result([result])

    def _segment_for(self, size: int) -> _Segment:
        """The segment the next batch goes to: the last one, unless it would grow past the
        segment size; then one that a checkpoint has covered, reused, or a new file."""
        if self._segments:
            current = self._segments[-1]
            if current.end + size <= self._segment_bytes or current.end == HEADER_BYTES:
                return current
        self._generation += 1
        reusable = (
            next(
                (s for s in self._segments[:-1] if s.last < self._checkpointed and not s.fresh),
                None,
            )
            if self._failed is None
            else None
        )
        if reusable is not None:
            self._segments.remove(reusable)
            reusable.generation = self._generation
            reusable.end = HEADER_BYTES
            reusable.last = 0
            reusable.fresh = True
            segment = reusable
        else:
            taken = {s.name for s in self._segments}
            name = next(f"{PREFIX_NAME}{n}" for n in range(len(taken) + 1)
                        if f"{PREFIX_NAME}{n}" not in taken)  # fmt: skip
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=self._folder)  # fmt: skip
            segment = _Segment(name, fd, self._generation, new=True)
        self._segments.append(segment)
        if len(self._segments) > 1 and self._checkpointing is None and not self._closed:
            # The segments left behind can be reused once a checkpoint covers them.
            task = asyncio.ensure_future(self.checkpoint())
            task.add_done_callback(_log_failure)
        return segment

    async def close(self) -> None:
        """Wait for the batches queued, then close the segments (their files stay)."""
        while True:  # a checkpoint, or a cancelled request's marker, may commit meanwhile
            waiting: list[asyncio.Future[Any]] = [p[-1] for p in self._pending]
            if self._in_flight is not None and not self._in_flight.done():
                waiting.append(self._in_flight)
            if self._checkpointing is not None:
                waiting.append(self._checkpointing)
            if not waiting:
                break
            await asyncio.wait(waiting)
        self._closed = True
        for segment in self._segments:
            os.close(segment.fd)
        self._segments.clear()


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("a journal checkpoint failed (it is tried again later): %s", error)


def _perform(steps: list[_uring.Op]) -> list[int]:
    """The ring's operations of a batch, by system calls (where the ring could not take
    them), with the ring's results: a failure ends the chain."""
    results: list[int] = []
    for step in steps:
        try:
            if step.opcode == _uring.OP_WRITE:
                data = step.keep[0]
                assert isinstance(data, bytes)
                written = 0
                while written < len(data):
                    written += os.pwrite(step.fd, memoryview(data)[written:], step.offset + written)
                results.append(written)
            elif step.opcode == _uring.OP_FSYNC:
                (os.fdatasync if step.op_flags else os.fsync)(step.fd)
                results.append(0)
            else:
                raise ValueError(f"unexpected operation {step.opcode}")
        except OSError as exc:
            results.append(-(exc.errno or errno.EIO))
            results += [-errno.ECANCELED] * (len(steps) - len(results))
            break
    return results
