"""The local backend's journal of small writes (``backends._journal``): its format, the group
commit, checkpoints, and the replay after a crash of the machine.

A crash cannot be made here, so its outcome is: a journaled backend writes; its journal
segments are copied into a folder that a process of an earlier boot would have left (its lock
file names another boot); the objects are then damaged as a lost writeback would leave them
(emptied, gone, or an older version back); and a new backend starts on the store."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backends import _journal
from backends.local import LOCK_NAME, RESTARTED_SUFFIX, TMP_DIR, LocalBackend
from tests.backends.helpers import get, put, started

KEY_A, KEY_B = "tenants/acme/a.csv", "tenants/acme/dir/b.csv"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    async with started(LocalBackend(tmp_path / "store")) as backend:
        assert backend._journal is not None, "the tests' folder is on a disk (io_uring on)"
        yield backend


def tmp_root(store: LocalBackend) -> Path:
    return Path(store.base_path) / TMP_DIR


def own_folder(store: LocalBackend) -> Path:
    return tmp_root(store) / store._tmp_segments[-1]


def left_by_a_crash(store: LocalBackend, boot: str = "an-earlier-boot") -> Path:
    """Copy the store's journal into a folder as a process of another boot leaves it."""
    folder = tmp_root(store) / secrets.token_hex(8)
    folder.mkdir()
    (folder / LOCK_NAME).write_text(boot)
    for segment in own_folder(store).glob(f"{_journal.PREFIX_NAME}*"):
        shutil.copy(segment, folder / segment.name)
    return folder


def this_boot() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


# -- the format -------------------------------------------------------------------------------


def segment(generation: int, *records: bytes) -> bytes:
    return _journal.header(generation) + b"".join(records)


def test_records_read_back_up_to_the_first_cut_damaged_or_stale_one() -> None:
    one = _journal.encode(7, 10, _journal.CONTENT, 42, "k/é", b'{"t":1}', b"body")
    two = _journal.encode(7, 11, _journal.MARKER, 0, "k/2", None, b"")
    stale = _journal.encode(6, 12, _journal.CONTENT, 1, "k/3", None, b"old")
    records = list(_journal.decode(segment(7, one, two, stale)))
    assert records == [
        _journal.Record(10, _journal.CONTENT, 42, "k/é", b'{"t":1}', b"body"),
        _journal.Record(11, _journal.MARKER, 0, "k/2", None, b""),
    ]  # the third is of an earlier use of the segment
    damaged = bytearray(segment(7, one, two))
    damaged[-1] ^= 1
    assert [r.key for r in _journal.decode(bytes(damaged))] == ["k/é"]
    assert [r.key for r in _journal.decode(segment(7, one, two)[:-1])] == ["k/é"]  # cut
    assert list(_journal.decode(segment(7, one)[:100])) == []  # no whole header
    assert list(_journal.decode(segment(8, one))) == []  # another generation's records


def content(stamp: int, key: str, body: bytes, inode: int = 1) -> _journal.Record:
    return _journal.Record(stamp, _journal.CONTENT, inode, key, None, body)


def marker(stamp: int, key: str, kind: int = _journal.MARKER, inode: int = 0) -> _journal.Record:
    return _journal.Record(stamp, kind, inode, key, None, b"")


def test_the_plan_keeps_each_keys_last_content_and_the_marker_after_it() -> None:
    records = [
        content(3, "old", b"before the checkpoint"),  # durable already
        _journal.Record(5, _journal.CHECKPOINT, 0, "", None, b""),
        content(20, "a", b"second"),  # given out of order: sorted by stamp
        content(10, "a", b"first"),
        content(11, "b", b"b"),
        marker(12, "b", inode=99),  # e.g. a large write after it
        marker(13, "c"),  # no content record: nothing to do
        marker(16, "e"),  # deleted...
        content(17, "e", b"again"),  # ...and written again
        content(18, "f", b"f"),
        marker(19, "f"),  # deleted...
        marker(21, "f", inode=7),  # ...and written again, not by the journal
    ]
    plan = {record.key: (record.body, m) for record, m in _journal.plan(records)}
    assert plan == {
        "a": (b"second", None),
        "b": (b"b", records[5]),
        "e": (b"again", None),
        "f": (b"f", records[11]),
    }
    # The latest checkpoint of any journal counts (a syncfs covers every process).
    later = _journal.Record(30, _journal.CHECKPOINT, 0, "", None, b"")
    assert _journal.plan([*records, later]) == []


# -- writing ----------------------------------------------------------------------------------


async def test_concurrent_small_writes_share_the_journals_flushes(store: LocalBackend) -> None:
    journal = store._journal
    assert journal is not None
    bodies = {f"tenants/acme/k{n}": secrets.token_bytes(4096) for n in range(64)}
    await put(store, "tenants/acme/first", b"makes the directory")
    before = (journal.batches, journal.records)
    await asyncio.gather(*(put(store, key, data) for key, data in bodies.items()))
    batches, records = journal.batches - before[0], journal.records - before[1]
    assert records == 64
    assert batches < records / 4, (batches, records)  # group commit
    for key, data in bodies.items():
        assert await get(store, key) == data
    recorded = _journal.read_folder(os.open(own_folder(store), os.O_RDONLY))
    assert {r.key: r.body for r in recorded if r.key in bodies} == bodies


async def test_without_the_journal_small_writes_flush_their_own_files(tmp_path: Path) -> None:
    async with started(LocalBackend(tmp_path / "store", journal=False)) as backend:
        assert backend._journal is None
        await put(backend, KEY_A, b"data")
        assert list(own_folder(backend).glob(f"{_journal.PREFIX_NAME}*")) == []
        assert await get(backend, KEY_A) == b"data"


async def test_segments_are_reused_once_a_checkpoint_covers_them(store: LocalBackend) -> None:
    assert store._ring is not None and store._journal is not None and store._own_tmp is not None
    await store._journal.close()
    journal = store._journal = _journal.Journal(store._own_tmp, store._ring, segment_bytes=100_000)
    for round_ in range(12):
        await asyncio.gather(
            *(put(store, f"tenants/acme/r{n}", bytes([round_]) * 4000) for n in range(16))
        )
        if journal._checkpointing is not None:  # (on a disk, much shorter than a segment)
            await journal._checkpointing
    await put(store, "tenants/acme/last", b"after the last checkpoint")
    # About 65 KB of records per round: at most one new segment each, three files in turn.
    assert journal._checkpointed > 0
    names = sorted(p.name for p in own_folder(store).glob(f"{_journal.PREFIX_NAME}*"))
    assert 2 <= len(names) <= 3, names
    folder = os.open(own_folder(store), os.O_RDONLY)
    try:
        records = _journal.read_folder(folder)
    finally:
        os.close(folder)
    assert any(r.kind == _journal.CHECKPOINT for r in records)
    plan = _journal.plan(records)
    # Only what came after the last checkpoint is to be replayed: none of the earlier rounds.
    bodies = {record.key: record.body for record, _ in plan}
    assert bodies.pop("tenants/acme/last") == b"after the last checkpoint"
    assert all(data == bytes([11]) * 4000 for data in bodies.values())


# -- the replay -------------------------------------------------------------------------------


async def test_after_a_crash_the_journal_brings_back_every_acknowledged_write(
    store: LocalBackend, tmp_path: Path
) -> None:
    # (A first write into a new directory is flushed with it, then marked: the later ones
    # are the journal's.)
    await put(store, KEY_A, b"version 1")
    await put(store, KEY_A, b"version 2, acknowledged", content_type="text/csv")
    await put(store, KEY_B, b"b, first")
    await put(store, KEY_B, b"b's body", metadata={"owner": "flow-7"})
    folder = left_by_a_crash(store)
    await store.close()
    base = Path(store.base_path)
    # What a lost writeback can leave: an emptied file, a name that never reached the disk.
    (base / KEY_A).write_bytes(b"")
    os.setxattr(base / KEY_A, "user.gateway", b'{"content_type":"text/plain"}')
    (base / KEY_B).unlink()
    async with started(LocalBackend(base)) as after:
        assert await get(after, KEY_A) == b"version 2, acknowledged"
        info = await after.info(KEY_A)
        assert info.content_type == "text/csv"
        assert await get(after, KEY_B) == b"b's body"
        assert (await after.info(KEY_B)).metadata == {"owner": "flow-7"}
    # The spent journal is gone (a later crash must not replay it); the folder is kept.
    kept = folder.with_name(folder.name + RESTARTED_SUFFIX)
    assert kept.is_dir() and list(kept.glob(f"{_journal.PREFIX_NAME}*")) == []


async def test_the_replay_leaves_a_file_that_already_holds_its_content(
    store: LocalBackend,
) -> None:
    info = await put(store, KEY_A, b"intact")
    left_by_a_crash(store)
    await store.close()
    async with started(LocalBackend(store.base_path)) as after:
        assert await after.info(KEY_A) == info  # same version: not written again


async def test_a_change_made_durable_after_a_journaled_write_is_not_undone(
    store: LocalBackend,
) -> None:
    await put(store, "tenants/acme/deleted", b"journaled, then deleted")
    await store.delete("tenants/acme/deleted")
    await put(store, "tenants/acme/big", b"small first")
    await put(store, "tenants/acme/big", b"L" * (2 * 1024 * 1024))  # streamed, fsynced
    await put(store, "tenants/acme/tree/x", b"in a tree removed later")
    await store.delete_prefix("tenants/acme/tree")
    await put(store, "tenants/acme/from/y", b"moved")
    await store.move("tenants/acme/from", "tenants/acme/to")
    await put(store, "tenants/acme/gone-file", b"a file moved")
    await store.move("tenants/acme/gone-file", "tenants/acme/moved-file")
    left_by_a_crash(store)
    await store.close()
    async with started(LocalBackend(store.base_path)) as after:
        for key in ("deleted", "tree/x", "from/y", "gone-file"):
            with pytest.raises(FileNotFoundError):
                await after.info(f"tenants/acme/{key}")
        assert await get(after, "tenants/acme/big") == b"L" * (2 * 1024 * 1024)
        assert await get(after, "tenants/acme/to/y") == b"moved"
        assert await get(after, "tenants/acme/moved-file") == b"a file moved"


async def test_a_journaled_file_still_at_its_key_after_a_later_marker_is_made_whole(
    store: LocalBackend,
) -> None:
    # Two processes' changes at one moment can be recorded in the other order than made:
    # the delete's marker is newer, but the journaled file is what the key names.
    await put(store, KEY_A, b"makes the directory")
    await put(store, KEY_A, b"the journaled content")
    folder = left_by_a_crash(store)
    segment_file = next(folder.glob(f"{_journal.PREFIX_NAME}*"))
    data = segment_file.read_bytes()
    count = len(list(_journal.decode(data)))
    generation = int.from_bytes(data[8:16], "little")
    late = _journal.encode(generation, 2**62, _journal.MARKER, 0, KEY_A, None, b"")
    with segment_file.open("ab") as file:
        file.write(late)  # a delete's marker, stamped after the write
    assert len(list(_journal.decode(segment_file.read_bytes()))) == count + 1
    await store.close()
    with (Path(store.base_path) / KEY_A).open("r+b") as file:
        file.truncate(0)  # the same file, its body never reached the disk
    async with started(LocalBackend(store.base_path)) as after:
        assert await get(after, KEY_A) == b"the journaled content"


async def test_a_process_that_died_during_this_boot_leaves_its_files_as_they_are(
    store: LocalBackend,
) -> None:
    await put(store, KEY_A, b"in the kernel's cache")
    folder = left_by_a_crash(store, boot=this_boot())
    await store.close()
    path = Path(store.base_path) / KEY_A
    path.write_bytes(b"changed since, by hand")
    async with started(LocalBackend(store.base_path)):
        assert not folder.exists()  # removed, unread: the machine kept running
        assert path.read_bytes() == b"changed since, by hand"


async def test_a_journal_removed_at_shutdown_leaves_a_checkpoint_for_the_others(
    store: LocalBackend,
) -> None:
    # One process journals v1; another writes v2, shuts down cleanly (its journal, which
    # recorded v2, goes); the machine crashes. v1's record must not undo v2.
    await put(store, KEY_A, b"makes the directory")
    await put(store, KEY_A, b"v1, journaled by the first process")
    async with started(LocalBackend(store.base_path)) as other:
        await put(other, KEY_A, b"v2, by a process that has exited since")
    folder = left_by_a_crash(store)
    await store.close()
    checkpoint = tmp_root(store) / "checkpoint"
    boot, stamp = checkpoint.read_text().split()
    assert boot == this_boot()
    checkpoint.write_text(f"an-earlier-boot {stamp}")  # as if that boot had crashed then
    async with started(LocalBackend(store.base_path)) as after:
        assert await get(after, KEY_A) == b"v2, by a process that has exited since"
    assert not folder.exists()  # replayed (nothing to do), then kept as *.restarted


async def test_a_cancelled_delete_still_records_its_marker(store: LocalBackend) -> None:
    await put(store, KEY_A, b"makes the directory")
    await put(store, KEY_A, b"journaled")
    deleting = asyncio.ensure_future(store.delete(KEY_A))
    await asyncio.sleep(0)  # the unlink is under way in a thread
    deleting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await deleting
    journal = store._journal
    assert journal is not None
    for _ in range(200):  # the thread ends, then its marker is committed
        if not (Path(store.base_path) / KEY_A).exists() and not journal._pending:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    folder = os.open(own_folder(store), os.O_RDONLY)
    try:
        markers = [r for r in _journal.read_folder(folder) if r.kind == _journal.MARKER]
    finally:
        os.close(folder)
    # (the first write, into a new directory, was marked too: with its file's inode)
    assert [r.inode for r in markers if r.key == KEY_A][-1:] == [0]


async def test_without_io_uring_the_journal_still_records_markers(tmp_path: Path) -> None:
    async with started(LocalBackend(tmp_path / "store", io_uring=False)) as backend:
        assert backend._ring is None and backend._journal is not None
        await put(backend, KEY_A, b"flushed by a thread")
        await backend.delete(KEY_A)
        folder = os.open(own_folder(backend), os.O_RDONLY)
        try:
            records = _journal.read_folder(folder)
        finally:
            os.close(folder)
        assert [r.kind for r in records if r.key == KEY_A] == [_journal.MARKER] * 2
        assert all(r.kind != _journal.CONTENT for r in records)


async def test_after_a_failed_syncfs_no_write_is_acknowledged(
    store: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put(store, KEY_A, b"makes the directory")

    def lost(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_journal, "syncfs", lost)
    journal = store._journal
    assert journal is not None
    with pytest.raises(OSError):
        await journal.checkpoint()
    with pytest.raises(OSError) as caught:
        await put(store, KEY_A, b"after the lost writeback")
    assert caught.value.errno == 5


async def test_a_file_move_whose_rename_never_reached_the_disk_leaves_the_file_where_it_was(
    store: LocalBackend,
) -> None:
    await put(store, KEY_A, b"makes the directory")
    await put(store, KEY_A, b"journaled, then moved")
    await store.move(KEY_A, "tenants/acme/moved.csv")
    left_by_a_crash(store)
    await store.close()
    base = Path(store.base_path)
    os.rename(base / "tenants/acme/moved.csv", base / KEY_A)  # the rename was lost
    async with started(LocalBackend(store.base_path)) as after:
        assert await get(after, KEY_A) == b"journaled, then moved"
        with pytest.raises(FileNotFoundError):
            await after.info("tenants/acme/moved.csv")


async def test_a_move_refused_leaves_no_marker(store: LocalBackend) -> None:
    await put(store, KEY_A, b"makes the directory")
    await put(store, KEY_A, b"a")
    await put(store, "tenants/acme/b.csv", b"b, journaled")
    with pytest.raises(FileExistsError):
        await store.move(KEY_A, "tenants/acme/b.csv")
    folder = os.open(own_folder(store), os.O_RDONLY)
    try:
        records = _journal.read_folder(folder)
    finally:
        os.close(folder)
    assert [r.kind for r in records if r.key == "tenants/acme/b.csv"] == [_journal.CONTENT]
    assert await get(store, "tenants/acme/b.csv") == b"b, journaled"
