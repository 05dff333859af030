"""The audit log's segments: a tenant's batches appended to one document for
``SEGMENT_SECONDS`` or ``SEGMENT_BYTES``, then another; documents read back whole lines only;
cursors that follow a document as it grows; one document per batch where the store cannot
append."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import gateway.audit as audit_module
from backends.local import LocalBackend
from backends.memory import MemoryBackend
from gateway.audit import AUDIT_PREFIX, NULL_TENANT_SEGMENT, SEGMENT_SECONDS, AuditLog, folder
from gateway.documents import encode
from tests.backends.helpers import eventually, started

STAMP = 1_700_000_000_000_000_000


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    async with started(LocalBackend(tmp_path / "store")) as backend:
        yield backend


@pytest.fixture
async def audit(store: LocalBackend) -> AsyncIterator[AuditLog]:
    log = AuditLog(store)
    try:
        yield log
    finally:
        await log.close()


class Clock:
    """``time`` as ``gateway.audit`` sees it, ``monotonic`` set by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(audit_module, "time", fake)
    return fake


def documents(store: LocalBackend, tenant: str = "acme") -> list[Path]:
    """The tenant's documents on disk, in name order."""
    where = Path(store.base_path) / AUDIT_PREFIX / tenant
    return sorted(where.iterdir()) if where.exists() else []


def lines(path: Path) -> list[int]:
    import json

    return [json.loads(line)["n"] for line in path.read_bytes().splitlines()]


def open_on(path: Path) -> int:
    """How many descriptors of this process are open on ``path``."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                count += 1
        except FileNotFoundError:
            continue
    return count


def batch_bytes(numbers: list[int]) -> int:
    return sum(len(encode({"n": n})) + 1 for n in numbers)


async def batch(
    audit: AuditLog, numbers: list[int], stamp: int = STAMP, tenant: str | None = "acme"
) -> list[bool]:
    """Submit records ``{"n": number}`` at once (one batch), wait for them, say if written."""
    futures = [audit.submit(tenant, {"n": n}, stamp + i) for i, n in enumerate(numbers)]
    assert await audit.flush()
    results = []
    for future in futures:
        assert future is not None
        results.append(future.result())
    return results


async def read_all(audit: AuditLog, limit: int, tenant: str | None = "acme") -> list[int]:
    """Every record of the tenant's log, page after page of ``limit``."""
    found: list[int] = []
    cursor = None
    for _ in range(200):
        records, cursor = await audit.read(tenant, limit=limit, cursor=cursor)
        assert len(records) <= limit
        found += [record["n"] for record in records]
        if cursor is None:
            return found
    raise AssertionError(f"paging did not end; so far {found}")


# -- one document for a while ------------------------------------------------------------------


async def test_batches_within_segment_seconds_go_into_one_document(
    store: LocalBackend, audit: AuditLog
) -> None:
    assert await batch(audit, [0, 1], STAMP) == [True, True]
    (document,) = documents(store)
    assert document.name.startswith(f"{STAMP:020d}-")
    assert lines(document) == [0, 1]
    assert open_on(document) == 1  # kept open for the next batch
    assert await batch(audit, [2, 3, 4], STAMP + 10) == [True] * 3
    assert lines(document) == [0, 1, 2, 3, 4]
    assert await batch(audit, [5], STAMP + 20) == [True]
    assert documents(store) == [document]
    assert lines(document) == [0, 1, 2, 3, 4, 5]
    records, cursor = await audit.read("acme")
    assert [r["n"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert cursor is None
    assert audit.failures == 0


async def test_a_batch_after_segment_seconds_starts_a_new_document(
    store: LocalBackend, audit: AuditLog, clock: Clock
) -> None:
    await batch(audit, [0, 1], STAMP)
    clock.now += SEGMENT_SECONDS / 2
    await batch(audit, [2], STAMP + 100)
    (first,) = documents(store)
    clock.now += SEGMENT_SECONDS / 2  # its full time since it was made
    await batch(audit, [3, 4], STAMP + 200)
    assert documents(store)[0] == first
    assert len(documents(store)) == 2
    second = documents(store)[1]
    assert second.name.startswith(f"{STAMP + 200:020d}-")
    assert lines(first) == [0, 1, 2]
    assert lines(second) == [3, 4]
    await eventually(lambda: open_on(first) == 0)  # the old one is closed
    assert open_on(second) == 1
    clock.now += SEGMENT_SECONDS * 5
    await batch(audit, [5], STAMP + 300)
    assert [lines(d) for d in documents(store)] == [[0, 1, 2], [3, 4], [5]]
    assert await read_all(audit, 100) == [0, 1, 2, 3, 4, 5]


async def test_a_real_short_segment_seconds_starts_a_new_document(
    store: LocalBackend, audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "SEGMENT_SECONDS", 0.05)
    await batch(audit, [0], STAMP)
    await asyncio.sleep(0.1)
    await batch(audit, [1], STAMP + 1)
    assert [lines(d) for d in documents(store)] == [[0], [1]]
    assert await read_all(audit, 10) == [0, 1]


async def test_a_batch_that_would_pass_segment_bytes_starts_a_new_document(
    store: LocalBackend, audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, third = [0, 1, 2], [3, 4], [5]
    limit = batch_bytes(first) + batch_bytes(second)
    monkeypatch.setattr(audit_module, "SEGMENT_BYTES", limit)
    await batch(audit, first, STAMP)
    await batch(audit, second, STAMP + 10)  # exactly SEGMENT_BYTES: still the same
    (document,) = documents(store)
    assert document.stat().st_size == limit
    await batch(audit, third, STAMP + 20)  # one byte more would pass it: a new one
    assert [lines(d) for d in documents(store)] == [[0, 1, 2, 3, 4], [5]]
    big = list(range(100, 100 + limit))  # larger than a segment on its own: one anyway
    await batch(audit, big, STAMP + 30)
    await batch(audit, [6], STAMP + 40_000)
    assert [lines(d) for d in documents(store)] == [[0, 1, 2, 3, 4], [5], big, [6]]
    assert await read_all(audit, 1000) == [0, 1, 2, 3, 4, 5, *big, 6]


# -- closed when idle, and at close ------------------------------------------------------------


async def test_an_idle_segment_is_closed_by_its_timer(
    store: LocalBackend, audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "SEGMENT_SECONDS", 0.2)
    started = time.monotonic()
    await batch(audit, [0, 1], STAMP)
    (document,) = documents(store)
    if time.monotonic() - started < 0.15:  # (a slow disk: already past its time)
        assert open_on(document) == 1
    await eventually(lambda: open_on(document) == 0, timeout=3)
    assert time.monotonic() - started >= 0.2
    assert lines(document) == [0, 1]
    await batch(audit, [2], STAMP + 1)  # nothing to append to: a new document
    assert [lines(d) for d in documents(store)] == [[0, 1], [2]]
    assert await read_all(audit, 10) == [0, 1, 2]


async def test_the_timer_waits_for_a_batch_being_appended(
    store: LocalBackend, audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    await batch(audit, [0], STAMP)
    (document,) = documents(store)
    segment = audit._segments["acme"]
    appendable = segment.appendable
    gate = asyncio.Event()
    entered = asyncio.Event()
    append = appendable.append

    async def held(data: bytes) -> None:
        entered.set()
        await gate.wait()
        await append(data)

    monkeypatch.setattr(appendable, "append", held)
    future = audit.submit("acme", {"n": 1}, STAMP + 1)
    assert future is not None
    await asyncio.wait_for(entered.wait(), 5)
    first_timer = segment.timer
    audit._expire("acme", segment)  # its time has come while the batch is being appended
    assert audit._segments.get("acme") is segment  # kept, and looked at again later
    assert segment.timer is not None and segment.timer is not first_timer
    assert open_on(document) == 1
    gate.set()
    assert await future is True
    assert lines(document) == [0, 1]
    audit._expire("acme", segment)  # then idle: closed
    await eventually(lambda: open_on(document) == 0, timeout=3)
    assert "acme" not in audit._segments
    assert audit.failures == 0


async def test_close_closes_the_segments(store: LocalBackend) -> None:
    audit = AuditLog(store)
    await batch(audit, [0], STAMP)
    await batch(audit, [1], STAMP, tenant=None)
    (acme,) = documents(store)
    (null,) = documents(store, NULL_TENANT_SEGMENT)
    assert open_on(acme) == open_on(null) == 1
    await audit.close()
    assert open_on(acme) == open_on(null) == 0
    assert audit._segments == {}
    await audit.close()  # twice: nothing more
    assert lines(acme) == [0]
    assert lines(null) == [1]


async def test_close_writes_what_is_queued_first(store: LocalBackend) -> None:
    audit = AuditLog(store)
    futures = [audit.submit("acme", {"n": n}, STAMP + n) for n in range(5)]
    await audit.close()
    assert all(f is not None and f.done() and f.result() for f in futures)
    (document,) = documents(store)
    assert lines(document) == [0, 1, 2, 3, 4]
    assert open_on(document) == 0


# -- reading while documents grow --------------------------------------------------------------


async def test_a_cursor_at_the_end_of_a_document_gets_what_is_appended_to_it_later(
    store: LocalBackend, clock: Clock
) -> None:
    # Two processes over one store: "x" has documents A (done) and B (still appended to),
    # "y" has C, after B.
    x, y = AuditLog(store), AuditLog(store)
    try:
        await batch(x, [0], STAMP)
        clock.now += SEGMENT_SECONDS
        await batch(x, [1], STAMP + 1000)
        await batch(y, [100], STAMP + 2000)
        a, b, c = documents(store)
        records, cursor = await x.read("acme", limit=2)
        assert [r["n"] for r in records] == [0, 1]
        assert cursor == f"{b.name}~1"
        await batch(x, [2, 3], STAMP + 1500)  # into B, which C follows
        assert documents(store) == [a, b, c]
        assert lines(b) == [1, 2, 3]
        records, cursor = await x.read("acme", limit=3, cursor=cursor)
        assert [r["n"] for r in records] == [2, 3, 100]  # the new ones, then C's
        assert cursor is None
    finally:
        await x.close()
        await y.close()


async def test_a_cursor_inside_a_document_gets_what_is_appended_to_it_later(
    store: LocalBackend, clock: Clock
) -> None:
    x, y = AuditLog(store), AuditLog(store)
    try:
        await batch(x, [0, 1, 2], STAMP)
        await batch(y, [100], STAMP + 2000)
        records, cursor = await x.read("acme", limit=2)
        assert [r["n"] for r in records] == [0, 1]
        assert cursor == f"{documents(store)[0].name}~2"
        await batch(x, [3, 4], STAMP + 10)
        assert len(documents(store)) == 2
        records, cursor = await x.read("acme", limit=10, cursor=cursor)
        assert [r["n"] for r in records] == [2, 3, 4, 100]
        assert cursor is None
    finally:
        await x.close()
        await y.close()


async def test_a_page_that_ends_where_the_next_document_begins_resumes_at_it(
    store: LocalBackend, audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The page is full at the end of document A; document B is listed after it, and none of
    # its records fit: the next page must begin with B, not after it.
    monkeypatch.setattr(audit_module, "SEGMENT_BYTES", 1)  # a document per batch
    await batch(audit, [0, 1], STAMP)
    await batch(audit, [2], STAMP + 10)
    assert len(documents(store)) == 2
    records, cursor = await audit.read("acme", limit=2)
    assert [r["n"] for r in records] == [0, 1]
    assert cursor is not None
    records, cursor = await audit.read("acme", limit=2, cursor=cursor)
    assert [r["n"] for r in records] == [2]
    assert cursor is None


async def test_a_document_still_empty_is_not_skipped_once_it_has_records(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reader pages past a document another process has just made (no record yet, or its
    # first line half written); the records appended to it later must still be read.
    monkeypatch.setattr(audit_module, "SEGMENT_BYTES", 1)
    x = AuditLog(store)
    try:
        await batch(x, [0], STAMP)
        empty = await store.create_appendable(f"{folder('acme')}/{STAMP + 10:020d}-{'0' * 12}.json")
        await batch(x, [2], STAMP + 20)
        records, cursor = await x.read("acme", limit=1)
        assert [r["n"] for r in records] == [0]
        records, cursor = await x.read("acme", limit=1, cursor=cursor)
        assert records == []  # the empty one: nothing yet
        assert cursor is not None
        await empty.append(encode({"n": 1}) + b"\n")
        await empty.close()
        found: list[int] = []
        for _ in range(10):
            records, cursor = await x.read("acme", limit=1, cursor=cursor)
            found += [r["n"] for r in records]
            if cursor is None:
                break
        assert found == [1, 2]
    finally:
        await x.close()


@pytest.mark.parametrize(
    "layout",
    [[10], [1, 1, 1, 1, 1], [3, 2, 1, 4, 3, 1], [2, 2, 2]],
    ids=["one document", "one record each", "mixed", "two each"],
)
@pytest.mark.parametrize("limit", [1, 2, 3, 1000])
async def test_paging_returns_every_record_once_in_order(
    store: LocalBackend,
    audit: AuditLog,
    monkeypatch: pytest.MonkeyPatch,
    layout: list[int],
    limit: int,
) -> None:
    if len(layout) > 1:
        monkeypatch.setattr(audit_module, "SEGMENT_BYTES", 1)  # a document per batch
    numbers = iter(range(1000))
    for index, size in enumerate(layout):
        await batch(audit, [next(numbers) for _ in range(size)], STAMP + index * 1000)
    assert [len(lines(d)) for d in documents(store)] == layout
    assert await read_all(audit, limit) == list(range(sum(layout)))


async def test_a_cursor_ending_a_document_is_its_name_and_count(
    store: LocalBackend, audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "SEGMENT_BYTES", 1)
    await batch(audit, [0], STAMP)
    await batch(audit, [1], STAMP + 10)
    await batch(audit, [2], STAMP + 20)
    a, b, _ = documents(store)
    records, cursor = await audit.read("acme", limit=1)
    assert ([r["n"] for r in records], cursor) == ([0], f"{a.name}~1")
    records, cursor = await audit.read("acme", limit=1, cursor=cursor)
    assert ([r["n"] for r in records], cursor) == ([1], f"{b.name}~1")
    records, cursor = await audit.read("acme", limit=1, cursor=cursor)
    assert ([r["n"] for r in records], cursor) == ([2], None)


# -- lines without their end -------------------------------------------------------------------


async def test_an_unterminated_last_line_is_not_read_until_it_ends(
    store: LocalBackend, audit: AuditLog, caplog: pytest.LogCaptureFixture
) -> None:
    await batch(audit, [0, 1], STAMP)
    (document,) = documents(store)
    await audit.close()  # (nothing appends to it behind the test's back)
    with document.open("ab") as file:
        file.write(b'{"n":2,"time"')  # an append cut short (or still going)
    caplog.set_level(logging.WARNING, logger="gateway.audit")
    records, cursor = await audit.read("acme")
    assert [r["n"] for r in records] == [0, 1]
    assert cursor is None
    assert not [r for r in caplog.records if "not JSON" in r.getMessage()]
    with document.open("ab") as file:
        file.write(b':"later"}\n{"n":3}')
    records, _ = await audit.read("acme")
    assert [r["n"] for r in records] == [0, 1, 2]
    assert records[2]["time"] == "later"
    with document.open("ab") as file:
        file.write(b"\n")
    assert await read_all(audit, 1) == [0, 1, 2, 3]
    assert not [r for r in caplog.records if "not JSON" in r.getMessage()]


async def test_a_document_of_only_a_partial_line_reads_as_empty(
    store: LocalBackend, audit: AuditLog
) -> None:
    partial = await store.create_appendable(f"{folder('acme')}/{STAMP:020d}-{'a' * 12}.json")
    await partial.append(b'{"n":0')
    await partial.close()
    assert await audit.read("acme") == ([], None)


# -- failures ----------------------------------------------------------------------------------


async def test_a_failed_append_fails_its_batch_and_the_next_starts_a_new_document(
    store: LocalBackend,
    audit: AuditLog,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await batch(audit, [0, 1], STAMP)
    (first,) = documents(store)
    appendable = audit._segments["acme"].appendable
    attempts: list[bytes] = []

    async def broken(data: bytes) -> None:
        # half of the batch reaches the disk, then the disk fails
        attempts.append(data)
        fd = appendable._fd  # type: ignore[attr-defined]
        os.pwrite(fd, data[: len(data) // 2], appendable.size)
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(appendable, "append", broken)
    caplog.set_level(logging.WARNING, logger="gateway.audit")
    assert await batch(audit, [2], STAMP + 10) == [False]
    assert len(attempts) == 1
    assert audit.failures == 1
    assert "acme" not in audit._segments
    await eventually(lambda: open_on(first) == 0)  # retired: closed
    assert await batch(audit, [3, 4], STAMP + 20) == [True, True]
    assert len(attempts) == 1  # not the broken one again
    assert audit.failures == 1
    first_again, second = documents(store)
    assert first_again == first
    assert second.name.startswith(f"{STAMP + 20:020d}-")
    assert lines(second) == [3, 4]
    assert await read_all(audit, 100) == [0, 1, 3, 4]  # the half line is not read
    assert not [r for r in caplog.records if "not JSON" in r.getMessage()]


async def test_a_failed_append_of_several_batches_counts_each(
    store: LocalBackend, audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    await batch(audit, [0], STAMP)
    appendable = audit._segments["acme"].appendable

    async def broken(data: bytes) -> None:
        raise OSError(errno.ENOSPC, "no space left on device")

    monkeypatch.setattr(appendable, "append", broken)
    assert await batch(audit, [1, 2, 3], STAMP + 10) == [False, False, False]
    assert audit.failures == 3
    assert await batch(audit, [4], STAMP + 20) == [True]
    assert audit.failures == 3
    assert await read_all(audit, 100) == [0, 4]
    assert len(documents(store)) == 2


# -- stores that cannot append, tenants --------------------------------------------------------


async def test_where_the_store_cannot_append_each_batch_is_a_document() -> None:
    backend = MemoryBackend()
    await backend.start()
    audit = AuditLog(backend)
    try:
        assert await batch(audit, [0, 1], STAMP) == [True, True]
        assert await batch(audit, [2], STAMP + 10) == [True]
        assert await batch(audit, [3, 4, 5], STAMP + 20) == [True] * 3
        page = await backend.list(folder("acme"), recursive=True)
        names = [entry.name.rsplit("/", 1)[-1] for entry in page.entries]
        assert len(names) == 3
        assert [name[:20] for name in names] == [
            f"{STAMP:020d}",
            f"{STAMP + 10:020d}",
            f"{STAMP + 20:020d}",
        ]
        info = await backend.info(page.entries[0].name)
        assert info.content_type == "application/x-ndjson"
        assert await read_all(audit, 100) == [0, 1, 2, 3, 4, 5]
        for limit in (1, 2, 3, 4):
            assert await read_all(audit, limit) == [0, 1, 2, 3, 4, 5]
        assert audit._segments == {}
        assert audit.failures == 0
    finally:
        await audit.close()
        await backend.close()


async def test_where_documents_never_grow_a_page_goes_on_after_its_last_one() -> None:
    # No count in the cursor: the next page neither lists nor reads that document again.
    backend = MemoryBackend()
    await backend.start()
    audit = AuditLog(backend)
    try:
        for n in range(3):
            await batch(audit, [n], STAMP + 10 * n)
        page = await backend.list(folder("acme"), recursive=True)
        names = [entry.name.rsplit("/", 1)[-1] for entry in page.entries]
        records, cursor = await audit.read("acme", limit=2)
        assert ([r["n"] for r in records], cursor) == ([0, 1], names[1])
        records, cursor = await audit.read("acme", limit=2, cursor=cursor)
        assert ([r["n"] for r in records], cursor) == ([2], None)
    finally:
        await audit.close()
        await backend.close()


async def test_tenants_get_documents_of_their_own(store: LocalBackend, audit: AuditLog) -> None:
    futures = [
        audit.submit("acme", {"n": 0}, STAMP),
        audit.submit("beta", {"n": 10}, STAMP + 1),
        audit.submit(None, {"n": 20}, STAMP + 2),
        audit.submit("acme", {"n": 1}, STAMP + 3),
    ]
    assert await audit.flush()
    assert all(f is not None and f.result() for f in futures)
    await batch(audit, [2], STAMP + 10, tenant="acme")
    await batch(audit, [21], STAMP + 11, tenant=None)
    root = Path(store.base_path) / AUDIT_PREFIX
    assert sorted(p.name for p in root.iterdir()) == ["acme", "beta", "~"]
    assert [lines(d) for d in documents(store, "acme")] == [[0, 1, 2]]
    assert [lines(d) for d in documents(store, "beta")] == [[10]]
    assert [lines(d) for d in documents(store, "~")] == [[20, 21]]
    assert await read_all(audit, 100, "acme") == [0, 1, 2]
    assert await read_all(audit, 100, "beta") == [10]
    assert await read_all(audit, 100, None) == [20, 21]
    assert await read_all(audit, 100, "gamma") == []


async def test_past_max_segments_open_a_tenant_gets_a_document_per_batch(
    store: LocalBackend, audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Descriptors stay bounded however many tenants write at once: with MAX_SEGMENTS
    # documents open, another tenant's batches are whole documents, as on S3.
    monkeypatch.setattr(audit_module, "MAX_SEGMENTS", 2)
    await batch(audit, [0], STAMP, tenant="acme")
    await batch(audit, [10], STAMP + 1, tenant="beta")
    await batch(audit, [20], STAMP + 2, tenant="gamma")
    await batch(audit, [21], STAMP + 3, tenant="gamma")
    await batch(audit, [1], STAMP + 4, tenant="acme")
    assert sorted(audit._segments, key=str) == ["acme", "beta"]
    assert [lines(d) for d in documents(store, "acme")] == [[0, 1]]
    gamma = documents(store, "gamma")
    assert [lines(d) for d in gamma] == [[20], [21]]
    assert all(open_on(d) == 0 for d in gamma)  # written whole, closed
    assert await read_all(audit, 1, "gamma") == [20, 21]
    await audit.close()
    assert audit._segments == {}
    await batch(audit, [22], STAMP + 5, tenant="gamma")  # room again: appends
    assert "gamma" in audit._segments


async def test_a_cursor_of_a_name_alone_goes_on_after_that_document(
    store: LocalBackend, audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As gateways before segments gave them at the end of a page.
    monkeypatch.setattr(audit_module, "SEGMENT_BYTES", 1)
    await batch(audit, [0, 1], STAMP)
    await batch(audit, [2], STAMP + 10)
    first, _ = documents(store)
    records, cursor = await audit.read("acme", limit=10, cursor=first.name)
    assert ([r["n"] for r in records], cursor) == ([2], None)


@pytest.mark.parametrize(
    "cursor", ["nonsense", f"{STAMP:020d}-{'a' * 12}.json~", f"{STAMP:020d}-{'a' * 12}.json~-1"]
)
async def test_a_cursor_not_given_by_the_gateway_is_refused(audit: AuditLog, cursor: str) -> None:
    from gateway.errors import BadRequest

    with pytest.raises(BadRequest):
        await audit.read("acme", cursor=cursor)


# -- found in review -----------------------------------------------------------------------------


async def test_a_cursor_whose_document_was_deleted_goes_on_with_the_next_whole(
    store: LocalBackend, audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "SEGMENT_BYTES", 1)  # a document per batch
    await batch(audit, [0, 1, 2, 3], STAMP)
    await batch(audit, [4, 5, 6, 7], STAMP + 10)
    first, _ = documents(store)
    records, cursor = await audit.read("acme", limit=3)
    assert [r["n"] for r in records] == [0, 1, 2]
    assert cursor == f"{first.name}~3"
    first.unlink()
    records, cursor = await audit.read("acme", limit=3, cursor=cursor)
    assert [r["n"] for r in records] == [4, 5, 6]  # none of the next one skipped


async def test_max_segments_holds_for_tenants_starting_at_once(
    store: LocalBackend, audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "MAX_SEGMENTS", 2)
    tenants = [f"t{i}" for i in range(8)]
    futures = [audit.submit(t, {"n": i}, STAMP + i) for i, t in enumerate(tenants)]
    assert await audit.flush()
    assert all(f is not None and f.result() for f in futures)
    assert len(audit._segments) <= 2
    for i, tenant in enumerate(tenants):
        assert await read_all(audit, 10, tenant) == [i]
