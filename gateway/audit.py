"""The per-tenant audit log: who changed what, when, and what the gateway answered.

Records are written in batches (group commit) into JSON-lines documents, in the gateway's own
storage under the system prefix, each created create-only (named by the time of its first
record and a random part) so replicas over one store never overwrite each other::

    .gateway/audit/<tenant id, or "~" for the null tenant>/<time_ns:020d>-<random>.json
        {"time": ..., "tenant": ..., "identity": {"kind": ..., "name": ...},
         "action": ..., "key": ..., "status": ...}      <- one line per record

Where the store can append (``Backend.create_appendable``: the local disk), a process appends
a tenant's batches to its current document for ``SEGMENT_SECONDS`` (or ``SEGMENT_BYTES``),
then starts another: a batch costs a write and an ``fdatasync``, where a new file costs an
inode, a rename and an ``fsync`` of the directory as well. With ``MAX_SEGMENTS`` tenants'
documents open, another tenant's batch is a document of its own (descriptors stay bounded).
Elsewhere (S3) each batch is a document of its own. Either way a batch is durable before its
requests hear it is written, and a reader never takes a line without its end (an append under
way, or cut by a crash).

What is recorded: every mutation (upload, delete, make directory, move; tenant update, soft
delete, restore, creation; role grants and revocations) that *passed authorization* on a tenant
that exists, whatever its outcome (2xx, 4xx such as 404/409/412, 5xx). A request refused by
authentication or authorization (401/403) is not recorded: such a caller must not be able to
make the gateway write to the store (the access log and the metrics show them). Mutations of
users, service accounts and tokens belong to no tenant and are not recorded here.

A record is queued after the response is decided; one background task writes what is queued
for each tenant as one document, at most ``CONCURRENCY`` documents at once and one per tenant
(what arrives while a tenant's document is being written goes into its next one), so a burst
of mutations costs a few writes, not one each, and nothing is dropped short of ``MAX_PENDING``
queued records (a store that has stopped answering). The request waits at most
``WAIT_BEFORE_RESPONSE`` seconds for its batch, so on a healthy store a client that reads the
audit log right after its change sees it. Shutdown flushes what is queued.

Reading: oldest first (by document, then line: documents of two processes interleave by
their first records), a page at a time; the cursor names a document and how many of its
records were already returned, so the cursor's document still gives what is appended to it
after the page. An earlier document of another process that grows after a page has passed
it (for up to ``SEGMENT_SECONDS``) is not read again: a reader at the live end of a log
written by several processes may miss those lines, as it could miss a batch written late.
There is no retention yet: records are kept until deleted from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from backends.base import SYSTEM_PREFIX, Appendable, Backend

from .documents import encode, one
from .errors import BadRequest

log = logging.getLogger("gateway.audit")

_T = TypeVar("_T")

AUDIT_PREFIX: Final = f"{SYSTEM_PREFIX}/audit"
NULL_TENANT_SEGMENT: Final = "~"  # outside the tenant-id grammar: no tenant can collide
CONCURRENCY: Final = 8
MAX_PENDING: Final = 100_000
MAX_BATCH: Final = 1000
WAIT_BEFORE_RESPONSE: Final = 0.5
FLUSH_TIMEOUT: Final = 10.0
MAX_KEY_CHARS: Final = 1024
MAX_DOCUMENT_BYTES: Final = 8 * 1024 * 1024
SEGMENT_SECONDS: Final = 1.0
SEGMENT_BYTES: Final = 1024 * 1024
MAX_SEGMENTS: Final = 64  # documents open for appends at once (a descriptor each)
CONTENT_TYPE: Final = "application/x-ndjson"
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
_READ_CONCURRENCY: Final = 16
_RECORD_NAME: Final = re.compile(r"[0-9]{20}-[0-9a-f]{12}\.json")
_CURSOR: Final = re.compile(r"([0-9]{20}-[0-9a-f]{12}\.json)(?:~([0-9]{1,7}))?")


@dataclass(slots=True)
class Pending:
    """A mutation that passed authorization; the middleware adds the status and writes it."""

    tenant: str | None
    action: str
    key: str | None = None


def folder(tenant: str | None) -> str:
    return f"{AUDIT_PREFIX}/{NULL_TENANT_SEGMENT if tenant is None else tenant}"


def iso_time(time_ns: int) -> str:
    """A time, ISO 8601 in UTC with milliseconds (``2026-11-28T13:35:12.345Z``)."""
    seconds, rest = divmod(time_ns, 1_000_000_000)
    return f"{_iso_second(seconds)}.{rest // 1_000_000:03d}Z"


@functools.lru_cache(maxsize=4)
def _iso_second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def make_record(
    pending: Pending, identity: dict[str, str] | None, status: int, time_ns: int
) -> dict[str, Any]:
    key = pending.key
    if key is not None and len(key) > MAX_KEY_CHARS:
        key = key[:MAX_KEY_CHARS] + "…"
    return {
        "time": iso_time(time_ns),
        "tenant": pending.tenant,
        "identity": identity,
        "action": pending.action,
        "key": key,
        "status": status,
    }


@dataclass(slots=True)
class _Segment:
    """A tenant's document that batches are appended to, while it is young."""

    appendable: Appendable
    opened: float  # time.monotonic()
    timer: asyncio.TimerHandle | None = None

    def old(self) -> bool:
        return time.monotonic() - self.opened >= SEGMENT_SECONDS


class AuditLog:
    """Queues records, writes them a batch per tenant in the background, reads them back."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._queues: dict[str | None, list[tuple[bytes, int, asyncio.Future[bool]]]] = {}
        self._queued = 0
        self._writer: asyncio.Task[None] | None = None
        self._semaphore = asyncio.Semaphore(CONCURRENCY)
        self._writes: set[asyncio.Task[None]] = set()
        self._writing: set[str | None] = set()  # tenants whose document is being written
        self._written = asyncio.Event()  # set when a document write ends
        self._segments: dict[str | None, _Segment] = {}  # each tenant's, where appending
        self._closing: set[asyncio.Future[None]] = set()
        self._creating = 0  # segments being created
        self.failures = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        return self._queued

    def submit(
        self, tenant: str | None, record: dict[str, Any], time_ns: int
    ) -> asyncio.Future[bool] | None:
        """Queue ``record`` for ``tenant``'s log; return a future (``True``: written), or
        ``None`` if it was dropped (``MAX_PENDING`` records already queued)."""
        if self._queued >= MAX_PENDING:
            self.dropped += 1
            log.warning("audit log backlog full (%d queued): a record was dropped", MAX_PENDING)
            return None
        data = encode(record)
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(tenant, []).append((data, time_ns, done))
        self._queued += 1
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._run(), name="audit-writer")
        return done

    async def _run(self) -> None:
        while self._queued:
            started = False
            for tenant in list(self._queues):
                if tenant in self._writing:
                    continue  # its records gather into one batch meanwhile
                batch = self._queues[tenant][:MAX_BATCH]
                del self._queues[tenant][: len(batch)]
                if not self._queues[tenant]:
                    del self._queues[tenant]
                self._queued -= len(batch)
                self._writing.add(tenant)
                await self._semaphore.acquire()
                task = asyncio.create_task(self._write(tenant, batch), name="audit-write")
                self._writes.add(task)
                task.add_done_callback(self._writes.discard)
                started = True
            if not started:
                self._written.clear()
                await self._written.wait()
            elif not self._queued:
                await asyncio.sleep(0)  # let requests of this burst join the next batch

    async def _write(
        self, tenant: str | None, batch: list[tuple[bytes, int, asyncio.Future[bool]]]
    ) -> None:
        data = b"\n".join(item[0] for item in batch) + b"\n"
        written = False
        try:
            await self._store(tenant, batch[0][1], data)
            written = True
        except asyncio.CancelledError:
            self.failures += len(batch)
            log.warning("%d audit record(s) of tenant %r abandoned at shutdown", len(batch), tenant)
            raise
        except Exception as exc:
            self.failures += len(batch)
            log.warning(
                "%d audit record(s) of tenant %r not written: %s",
                len(batch), tenant, type(exc).__name__,
            )  # fmt: skip
        finally:
            self._semaphore.release()
            self._writing.discard(tenant)
            self._written.set()
            for _, _, done in batch:
                if not done.done():
                    done.set_result(written)

    async def _store(self, tenant: str | None, stamp: int, data: bytes) -> None:
        """Store one batch (``data``, its first record at ``stamp``): appended to the tenant's
        current document where the store appends, else as a document of its own."""
        if self._backend.appends:
            segment = await self._segment(tenant, stamp, len(data))
            if segment is not None:
                try:
                    await segment.appendable.append(data)
                except BaseException:
                    self._retire(tenant)  # its end is unknown: the next batch starts another
                    raise
                return
        await self._create(
            tenant,
            stamp,
            lambda key: self._backend.write(
                key, one(data), content_type=CONTENT_TYPE, exclusive=True
            ),
        )

    async def _segment(self, tenant: str | None, stamp: int, size: int) -> _Segment | None:
        """The tenant's document to append ``size`` bytes to: the current one while it is
        young and small enough, else a new one; None where the store cannot append, or
        ``MAX_SEGMENTS`` other tenants' documents are open."""
        current = self._segments.get(tenant)
        if current is not None:
            if current.appendable.size + size <= SEGMENT_BYTES and not current.old():
                return current
            self._retire(tenant)
        if len(self._segments) + self._creating >= MAX_SEGMENTS:
            return None  # many tenants at once: this batch is a document of its own
        opened = time.monotonic()
        self._creating += 1
        try:
            create = functools.partial(self._backend.create_appendable, content_type=CONTENT_TYPE)
            created = await self._create(tenant, stamp, create)
        finally:
            self._creating -= 1
        if created is None:
            return None
        segment = _Segment(created, opened)
        self._segments[tenant] = segment
        segment.timer = asyncio.get_running_loop().call_later(
            SEGMENT_SECONDS, self._expire, tenant, segment
        )
        return segment

    def _expire(self, tenant: str | None, segment: _Segment) -> None:
        """Close the tenant's document once it is past its time and no batch is being
        stored for the tenant (an idle process keeps none open)."""
        if self._segments.get(tenant) is not segment:
            return  # already replaced
        if tenant in self._writing:  # its batch may be appending to it: look again later
            segment.timer = asyncio.get_running_loop().call_later(
                SEGMENT_SECONDS, self._expire, tenant, segment
            )
            return
        self._retire(tenant)

    def _retire(self, tenant: str | None) -> None:
        """Stop appending to the tenant's current document and close it."""
        segment = self._segments.pop(tenant, None)
        if segment is None:
            return
        if segment.timer is not None:
            segment.timer.cancel()
        closing = asyncio.ensure_future(segment.appendable.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _create(
        self, tenant: str | None, stamp: int, create: Callable[[str], Awaitable[_T]]
    ) -> _T:
        """``create(key)`` under a new document name (create-only: a name taken is tried again)."""
        for attempt in range(3):
            key = f"{folder(tenant)}/{stamp + attempt:020d}-{secrets.token_hex(6)}.json"
            try:
                return await create(key)
            except FileExistsError:
                continue
        raise FileExistsError("could not name an audit document")

    async def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Wait until everything queued is written, at most ``timeout`` seconds; say if it was."""
        waiting = [done for queue in self._queues.values() for _, _, done in queue]
        tasks: list[asyncio.Future[Any]] = [*waiting, *self._writes]
        if self._writer is not None and not self._writer.done():
            tasks.append(self._writer)
        if not tasks:
            return True
        _done, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending and not self._writes

    async def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Flush, then abandon (and log) what the store did not take in time."""
        if not await self.flush(timeout):
            for task in [*self._writes, *([self._writer] if self._writer else [])]:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._writes, return_exceptions=True)
        for tenant in list(self._segments):
            self._retire(tenant)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def read(
        self, tenant: str | None, limit: int = DEFAULT_LIMIT, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Given a tenant, return a page of its records (oldest first) and the next cursor.

        A cursor is ``<document>~<records of it already returned>``.
        """
        skip = 0
        resume = None  # a cursor with a count: its document, read again past ``skip`` records
        start_after = None
        base = folder(tenant)
        if cursor is not None:
            match = _CURSOR.fullmatch(cursor)
            if match is None:
                raise BadRequest("the cursor is not one this gateway gave")
            name, count = match[1], match[2]
            if count is None:  # a bare name: the page starts after the document
                start_after = f"{base}/{name}"
            else:  # a count, even 0: the page starts at the document (it may have grown)
                resume, skip = name, int(count)
                # Names have one length: the name without ".json" sorts just before the name.
                start_after = f"{base}/{name[:-5]}"
        try:
            # Resuming, one more is listed: a page gets past the cursor's document even if it
            # gives nothing new.
            page = await self._backend.list(
                base,
                recursive=True,
                limit=limit if resume is None else limit + 1,
                start_after=start_after,
            )
        except (FileNotFoundError, NotADirectoryError):
            return [], None
        names = [entry.name for entry in page.entries if not entry.is_dir]
        if resume is not None and (not names or names[0].rsplit("/", 1)[-1] != resume):
            skip = 0  # the cursor's document is gone: what follows it starts whole
        semaphore = asyncio.Semaphore(_READ_CONCURRENCY)

        async def read_one(name: str) -> list[dict[str, Any]]:
            async with semaphore:
                return await self._read_document(name)

        documents = await asyncio.gather(*(read_one(name) for name in names))
        records: list[dict[str, Any]] = []
        for index, (name, found) in enumerate(zip(names, documents, strict=True)):
            found = found[skip:] if index == 0 else found
            room = limit - len(records)
            if len(found) > room:
                done = (skip if index == 0 else 0) + room
                records += found[:room]
                return records, f"{name.rsplit('/', 1)[-1]}~{done}"
            records += found
        next_cursor = None
        if page.next_cursor is not None and names:
            last = names[-1].rsplit("/", 1)[-1]
            if self._backend.appends:  # the document may grow before the next page: a count
                taken = len(documents[-1]) if len(names) > 1 else max(skip, len(documents[0]))
                next_cursor = f"{last}~{taken}"
            else:  # documents never grow here: the next page starts after it
                next_cursor = last
        return records, next_cursor

    async def _read_document(self, name: str) -> list[dict[str, Any]]:
        try:
            reader = await self._backend.open_read(name)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return []
        async with reader:
            if reader.info.size > MAX_DOCUMENT_BYTES:
                log.warning("audit document %s is too large; skipped", name)
                return []
            data = b"".join([chunk async for chunk in reader.chunks()])
        # Only whole lines: an append under way (or cut short by a crash) ends without one.
        data = data[: data.rfind(b"\n") + 1]
        records = []
        for line in data.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("a line of audit document %s is not JSON; skipped", name)
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


def now_ns() -> int:
    return time.time_ns()
