"""Bytes and object count per tenant, kept current without listing the tenant on each request.

The counters live in the storage, under the system prefix, so every worker and every replica
over one store adds to the same total::

    .gateway/usage/<tenant id, or "~" for the null tenant>/base.json
        {"bytes", "objects", "epoch", "computed"}       the last recompute (a full listing)
    .gateway/usage/<tenant id or "~">/p-<process id>.json
        {"bytes", "objects", "epoch", "updated"}        one process's changes since then

Each process counts its uploads and deletes in memory and writes its own document (its running
sum, overwritten) at most every ``FLUSH_INTERVAL`` seconds, so no two processes ever write the
same document. A tenant's usage is ``base`` plus every process document of the same ``epoch``:
a recompute writes a new epoch, which retires the older documents (each process starts a new
sum from its next flush). How current: a process's own changes at once; another process's
within ``FLUSH_INTERVAL`` plus the reader's ``CACHE_SECONDS``. Counting drifts only where two
writes race on one key (both count as new) or a client writes during a recompute's listing;
``recompute`` (``gateway tenants usage --recompute``) sets it exact again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

from backends.base import SYSTEM_PREFIX, Backend, Info

from . import keys
from .documents import read_whole, write_json
from .keys import NULL_SCOPE, Scope

log = logging.getLogger("gateway")

USAGE_PREFIX: Final = f"{SYSTEM_PREFIX}/usage"
NULL_SEGMENT: Final = "~"  # outside the tenant-id grammar, as in the registry
FLUSH_INTERVAL: Final = 1.0
CACHE_SECONDS: Final = 1.0
BASE: Final = "base.json"
LIST_PAGE: Final = 1000


@dataclass(frozen=True, slots=True)
class Totals:
    bytes: int
    objects: int

    def to_json(self) -> dict[str, int]:
        return {"bytes": self.bytes, "objects": self.objects}


def folder(tenant: str | None) -> str:
    """Given a tenant id (``None``: the null tenant), return its usage folder's key."""
    return f"{USAGE_PREFIX}/{NULL_SEGMENT if tenant is None else tenant}"


async def _read_json(backend: Backend, key: str) -> dict[str, Any] | None:
    data = await read_whole(backend, key)
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        log.warning("usage document %s is not JSON; ignored", key)
        return None
    return doc if isinstance(doc, dict) else None


def _int(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


async def walk_files(backend: Backend, scope: Scope, prefix: str = "") -> AsyncIterator[list[Info]]:
    """Yield, page by page, the files of ``scope`` below the physical directory ``prefix``
    (``""``: the scope's root); for the null tenant, never anything under a reserved name."""
    start = prefix or scope.root
    if scope.tenant is not None or start:
        tops = [start]
    else:  # the null tenant's root: each top-level entry that is not reserved
        tops = []
        cursor: str | None = None
        while True:
            page = await backend.list("", limit=LIST_PAGE, start_after=cursor)
            files = [e for e in page.entries if not e.is_dir and keys.visible(scope, e.name)]
            if files:
                yield files
            tops += [e.name for e in page.entries if e.is_dir and keys.visible(scope, e.name)]
            cursor = page.next_cursor
            if cursor is None:
                break
    for top in tops:
        cursor = None
        while True:
            try:
                page = await backend.list(top, recursive=True, limit=LIST_PAGE, start_after=cursor)
            except FileNotFoundError:
                break  # removed meanwhile, or a tenant with no file yet
            if page.entries:
                yield page.entries
            cursor = page.next_cursor
            if cursor is None:
                break


class Usage:
    """This process's counters, and the reading of every process's."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self.process_id = f"{int(time.time()):x}-{secrets.token_hex(6)}"
        self._pending: dict[str | None, list[int]] = {}  # changes not yet in our document
        self._written: dict[str | None, tuple[str, int, int]] = {}  # epoch, bytes, objects
        self._cache: dict[str | None, tuple[float, Totals]] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # -- counting --------------------------------------------------------------------------

    def add(self, tenant: str | None, size: int, objects: int) -> None:
        """Count ``size`` bytes and ``objects`` objects more (negative: fewer) in ``tenant``."""
        if size == 0 and objects == 0:
            return
        pending = self._pending.setdefault(tenant, [0, 0])
        pending[0] += size
        pending[1] += objects

    def start(self) -> None:
        """Flush every ``FLUSH_INTERVAL`` seconds in the background, until ``close``."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-flush")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
            except OSError as exc:  # the store failing: the changes stay pending
                log.warning("could not write usage counters: %r", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(OSError):
            await self.flush()

    async def flush(self) -> None:
        """Write this process's document of each tenant whose counters changed."""
        async with self._lock:
            for tenant in list(self._pending):
                size, objects = self._pending[tenant]
                await self._flush_one(tenant, size, objects)
                # Written and no longer pending in one step (no await in between): a read
                # in the meantime sees the change in one place or the other, never in none.
                pending = self._pending[tenant]
                pending[0] -= size
                pending[1] -= objects
                if pending == [0, 0]:
                    del self._pending[tenant]

    async def _flush_one(self, tenant: str | None, size: int, objects: int) -> None:
        base = await _read_json(self._backend, f"{folder(tenant)}/{BASE}")
        epoch = str(base.get("epoch", "")) if base else ""
        written_epoch, written_bytes, written_objects = self._written.get(tenant, ("", 0, 0))
        if written_epoch != epoch:  # a recompute counted everything before it
            written_bytes = written_objects = 0
        total = (epoch, written_bytes + size, written_objects + objects)
        doc = {"bytes": total[1], "objects": total[2], "epoch": epoch, "updated": time.time()}
        await write_json(self._backend, f"{folder(tenant)}/p-{self.process_id}.json", doc)
        self._written[tenant] = total
        self._cache.pop(tenant, None)

    # -- reading ---------------------------------------------------------------------------

    async def read(self, tenant: str | None) -> Totals:
        """Given a tenant, return its usage from the stored counters, plus this process's
        changes not yet written (a tenant never counted is counted now, once)."""
        where = folder(tenant)
        base = await _read_json(self._backend, f"{where}/{BASE}")
        if base is None:
            return await self.recompute(tenant)
        epoch = str(base.get("epoch", ""))
        size, objects = _int(base, "bytes"), _int(base, "objects")
        mine = f"{where}/p-{self.process_id}.json"
        cursor: str | None = None
        while True:
            page = await self._backend.list(where, limit=LIST_PAGE, start_after=cursor)
            for entry in page.entries:
                name = entry.name.rsplit("/", 1)[-1]
                if entry.is_dir or not name.startswith("p-") or entry.name == mine:
                    continue
                doc = await _read_json(self._backend, entry.name)
                if doc is not None and doc.get("epoch") == epoch:
                    size += _int(doc, "bytes")
                    objects += _int(doc, "objects")
            cursor = page.next_cursor
            if cursor is None:
                break
        # This process's own count: what it wrote and what it has not yet, taken together
        # (a flush may have run during the listing above).
        written = self._written.get(tenant)
        if written is not None and written[0] == epoch:
            size += written[1]
            objects += written[2]
        pending = self._pending.get(tenant, (0, 0))
        totals = Totals(size + pending[0], objects + pending[1])
        self._cache[tenant] = (time.monotonic(), totals)
        return totals

    async def current(self, tenant: str | None) -> Totals:
        """``read``, from a copy at most ``CACHE_SECONDS`` old (plus this process's changes)."""
        cached = self._cache.get(tenant)
        if cached is None or time.monotonic() - cached[0] > CACHE_SECONDS:
            return await self.read(tenant)
        pending = self._pending.get(tenant, (0, 0))
        at_read = cached[1]
        return Totals(at_read.bytes + pending[0], at_read.objects + pending[1])

    async def recompute(self, tenant: str | None) -> Totals:
        """List the tenant's files, store the sums as a new epoch, retire older counters."""
        scope = NULL_SCOPE if tenant is None else keys.tenant_scope(tenant)
        size = objects = 0
        async for page in walk_files(self._backend, scope):
            size += sum(entry.size for entry in page)
            objects += len(page)
        epoch = secrets.token_hex(8)
        where = folder(tenant)
        async with self._lock:
            self._pending.pop(tenant, None)  # counted by the listing (or within its window)
            await write_json(
                self._backend,
                f"{where}/{BASE}",
                {"bytes": size, "objects": objects, "epoch": epoch, "computed": time.time()},
            )
            self._written[tenant] = (epoch, 0, 0)
        await self._retire(where, epoch)
        totals = Totals(size, objects)
        self._cache[tenant] = (time.monotonic(), totals)
        return totals

    async def _retire(self, where: str, epoch: str) -> None:
        """Delete the process documents of older epochs (a live process writes a new one)."""
        cursor: str | None = None
        while True:
            try:
                page = await self._backend.list(where, limit=LIST_PAGE, start_after=cursor)
            except FileNotFoundError:
                return
            for entry in page.entries:
                if entry.is_dir or not entry.name.rsplit("/", 1)[-1].startswith("p-"):
                    continue
                doc = await _read_json(self._backend, entry.name)
                if doc is None or doc.get("epoch") != epoch:
                    await self._backend.delete_if_unchanged(entry.name, entry)
            cursor = page.next_cursor
            if cursor is None:
                return

    async def forget(self, tenant: str) -> None:
        """Delete a tenant's counters (its data is gone)."""
        async with self._lock:
            self._pending.pop(tenant, None)
            self._written.pop(tenant, None)
            self._cache.pop(tenant, None)
            with contextlib.suppress(FileNotFoundError):
                await self._backend.delete_prefix(folder(tenant))
